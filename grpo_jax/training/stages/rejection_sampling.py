"""`rejection_sampling` stages (DeepSeek-R1 arXiv 2501.12948 §2.3.3): sample K completions per prompt
from the current policy with the jitted sampler, score them with the configured rewards, keep the
correct and readable ones, mix in non-reasoning SFT data (reasoning : non-reasoning = 3 : 1 by default)
and write the set for SFT from the base model.

Each step samples one batch of prompts and appends every candidate, with its per-reward scores, to
`DIR/stages/<name>/candidates.jsonl`; a checkpoint records how many rows were written, so a resume
truncates the file back and nothing is duplicated. At the end the candidates are filtered:
  - truncated samples (no stop token) are dropped unless `drop_truncated=False`;
  - `keep`: (reward name, threshold) rules, every one must hold (e.g. accuracy >= 1, format >= 1,
    language_consistency >= 0.9); a dropped sample is counted under the first rule it fails;
  - duplicates (same prompt and completion) are dropped, then at most `max_per_prompt` per prompt;
and `sft.jsonl` (see `grpo_jax.data.rejection.write_rejection_sft`) plus `pairs.jsonl` (for `dpo`/`rm`
stages: per prompt, a kept completion preferred over a dropped one) are written atomically.

Several processes: each scores its own rows of the rollout; the candidate records (a line of JSON per
row) are gathered and process 0 writes them in global row order, then alone reads them back and writes
the two sets; the others wait for it (the counts it sends back are the barrier), and later stages read
the files from the workdir, which every process must see (as the checkpoints already require).
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
import optax
from absl import logging

from grpo_jax import models, sharding
from grpo_jax.data.files import load_jsonl_task
from grpo_jax.data.rejection import write_rejection_sft
from grpo_jax.training.grpo_step import rollout_to_batch
from grpo_jax.training.stages.base import register_stage, stage_dir
from grpo_jax.training.stages.rollout import RolloutStage
from grpo_jax.training.state import create_train_state

CANDIDATES_FILE, SFT_FILE, PAIRS_FILE = "candidates.jsonl", "sft.jsonl", "pairs.jsonl"


def _truncate_lines(path: str, num_lines: int) -> None:
    """Keep the first `num_lines` complete lines of `path` (create it empty if missing)."""
    if not os.path.exists(path):
        open(path, "w").close()
        return
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    kept = [line for line in lines[:num_lines] if line]
    with open(path, "wb") as f:
        f.write(b"".join(line + b"\n" for line in kept))


def first_failed_rule(scores: dict[str, float], keep: list[tuple[str, float]]) -> str | None:
    """The first `(name, threshold)` rule the scores fail (a missing or NaN score fails), else None."""
    for name, threshold in keep:
        value = scores.get(name)
        if value is None or not value >= threshold:
            return name
    return None


def preference_pairs_from_candidates(rows: list[dict], *, seed: int) -> list[dict]:
    """Per prompt with both kept and dropped samples: one (kept, dropped) pair per kept sample, the
    dropped one drawn at random. Rows carry "prompt", "completion", "kept"."""
    rng = np.random.default_rng(seed)
    by_prompt: dict[str, tuple[list[str], list[str]]] = {}
    for row in rows:
        kept, dropped = by_prompt.setdefault(row["prompt"], ([], []))
        (kept if row["kept"] else dropped).append(row["completion"])
    pairs = []
    for prompt, (kept, dropped) in by_prompt.items():
        kept, dropped = list(dict.fromkeys(kept)), list(dict.fromkeys(dropped))
        for chosen in kept if dropped else []:
            pairs.append(
                {"prompt": prompt, "chosen": chosen, "rejected": dropped[rng.integers(len(dropped))]}
            )
    return pairs


@register_stage("rejection_sampling")
class RejectionSamplingStage(RolloutStage):
    batch_field = "prompts_per_step"
    trains_weights = False  # samples a frozen policy: nothing to put on adapters

    @staticmethod
    def algo(stage_config):
        if stage_config.num_samples < 1 or not stage_config.temperature >= 0:
            raise ValueError("rejection_sampling: num_samples >= 1 and temperature >= 0 required")
        known = {r[0] for r in stage_config.rewards} | {r[0] for r in stage_config.host_rewards}
        unknown = [rule[0] for rule in stage_config.keep if rule[0] not in known]
        if unknown:
            raise ValueError(
                f"rejection_sampling.keep names {unknown}, which are not among its rewards {sorted(known)}"
            )

    def build(self, params):
        run, sc = self.run, self.config
        self.algo(sc)
        self.num_samples, self.temperature = sc.num_samples, sc.temperature
        self.build_data()
        self.directory = stage_dir(run.workdir, self.name)
        os.makedirs(self.directory, exist_ok=True)
        self.num_rows, self._file = 0, None
        state, shardings = create_train_state(
            params,
            optax.identity(),
            run.mesh,
            models.model_param_shardings(run.mesh, run.model_config),
            rng=self.state_rng(),
            with_reference=False,
        )
        reward_fn = self.in_graph_rewards()
        self.score = jax.jit(lambda batch: reward_fn(batch, None)[1]) if reward_fn is not None else None
        self.build_host_rewards()  # each host reward is scored on its own here (a keep rule), not summed
        return state, shardings

    def extra_state(self):
        return {"num_rows": self.num_rows}

    def load_extra_state(self, extra):
        self.num_rows = int(extra.get("num_rows", 0))

    def _candidates(self):
        """Process 0's append handle on candidates.jsonl, cut back to the rows the checkpoint counted."""
        if self._file is None:
            path = os.path.join(self.directory, CANDIDATES_FILE)
            _truncate_lines(path, self.num_rows)
            self._file = open(path, "a", encoding="utf-8")
        return self._file

    def train_step(self, state, global_step):
        t0 = time.time()
        prompts = next(self.data_iter)
        K = self.num_samples
        rng = jax.random.fold_in(state.rng, global_step)
        placed, rollout = self.rollout(state, prompts, K, self.temperature, rng=rng)
        local = self.local_rollout(rollout, placed, K)
        texts = self.decode(local)
        examples = self.examples_of(local)
        scores: dict[str, np.ndarray] = {}
        if self.score is not None:
            _, in_graph = sharding.local_rows(self.score(rollout_to_batch(rollout, placed, K)), self.run.mesh)
            scores.update(in_graph)
        if self.host_runner is not None:
            values, _ = self.host_runner(texts, examples)
            scores.update(values)
        keep = [tuple(rule) for rule in self.config.keep]
        drop_truncated = self.config.get("drop_truncated", True)
        mine = []
        for i, (text, example) in enumerate(zip(texts, examples, strict=True)):
            row_scores = {name: float(np.asarray(v)[i]) for name, v in scores.items()}
            reason = (
                "truncated" if local.truncated[i] and drop_truncated else first_failed_rule(row_scores, keep)
            )
            record = {
                "prompt": example["prompt"],
                "completion": text,
                "scores": row_scores,
                "dropped_by": reason,
            }
            mine.append((int(local.rows[i]), record))
        records = [record for _, record in sorted(sum(sharding.allgather_objects(mine), []))]
        if jax.process_index() == 0:
            out = self._candidates()
            out.writelines(json.dumps(record) + "\n" for record in records)
            out.flush()
        self.num_rows += len(records)
        failed = [record["dropped_by"] for record in records]
        m = {
            "rs/sampled": float(len(records)),
            "rs/passed": float(sum(r is None for r in failed)),
            "sample_time_s": time.time() - t0,
        }
        for name in ["truncated", *(rule[0] for rule in keep)]:
            m[f"rs/dropped/{name}"] = float(sum(r == name for r in failed))
        for name in scores:
            m[f"reward/{name}"] = float(np.mean([record["scores"][name] for record in records]))
        m["step_time_s"] = time.time() - t0
        return state, m

    def progress(self, metrics):
        return {"passed": metrics["rs/passed"]}

    def non_reasoning_rows(self) -> list[dict]:
        """Non-reasoning SFT rows: a JSONL file of {"prompt", "completion"} (`non_reasoning_data`), or
        with "task", the run's own demonstrations (`non_reasoning_examples` of its train split)."""
        source = self.config.non_reasoning_data
        if not source:
            return []
        if source == "task":
            rows = self.run.task.train[: self.config.non_reasoning_examples]
        else:
            rows = load_jsonl_task(source, kind="sft")
        return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]

    def finish(self, state):
        if self._file is not None:
            self._file.close()
            self._file = None
        counts, problem = {}, None
        if jax.process_index() == 0:
            counts, problem = self._write_sets()
        # Process 0's counts, to every process: the others wait here until the files are written.
        counts, problem = sharding.allgather_objects((counts, problem))[0]
        if problem:
            raise ValueError(problem)
        return {"rejection_sampling": counts, "files": {"sft": SFT_FILE, "pairs": PAIRS_FILE}}

    def _write_sets(self) -> tuple[dict, str | None]:
        """Read candidates.jsonl, write sft.jsonl and pairs.jsonl: (counts, why the set is empty or None)."""
        with open(os.path.join(self.directory, CANDIDATES_FILE), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        for row in rows:
            row["kept"] = row["dropped_by"] is None
        counts = write_rejection_sft(
            os.path.join(self.directory, SFT_FILE),
            [r["prompt"] for r in rows],
            [r["completion"] for r in rows],
            [1.0 if r["kept"] else 0.0 for r in rows],
            threshold=1.0,
            max_per_prompt=self.config.max_per_prompt or None,
            non_reasoning=self.non_reasoning_rows(),
            ratio=self.config.non_reasoning_ratio,
            seed=self.run.config.seed,
        )
        pairs = preference_pairs_from_candidates(rows, seed=self.run.config.seed)
        with open(os.path.join(self.directory, PAIRS_FILE + ".tmp"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p) + "\n" for p in pairs)
        os.replace(
            os.path.join(self.directory, PAIRS_FILE + ".tmp"), os.path.join(self.directory, PAIRS_FILE)
        )
        counts["num_pairs"] = len(pairs)
        dropped = {}
        for row in rows:
            if row["dropped_by"] is not None:
                dropped[row["dropped_by"]] = dropped.get(row["dropped_by"], 0) + 1
        counts["dropped_by"] = dropped
        logging.info("[%s] rejection sampling: %s", self.name, counts)
        if counts["num_written"]:
            return counts, None
        return counts, (
            f"stage {self.name!r} kept none of its {len(rows)} samples (dropped by {dropped}); "
            f"loosen config.{self.name}.keep or train the policy longer"
        )

    def close(self):
        if getattr(self, "_file", None) is not None:
            self._file.close()
        super().close()
