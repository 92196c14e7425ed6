"""Iterative GRPO's reward-model retraining (DeepSeekMath arXiv 2402.03300 §4.1.4): "new training sets
for the reward model are generated based on the sampling results from the policy model, and the reward
model is continually trained using a replay mechanism that incorporates 10% of historical data".

Used by a `grpo` stage with `reward_model_from` and `rm_retrain_every > 0`. Every step, each group of
VERIFIABLE prompts whose samples include a correct and an incorrect one (judged by the task's answer
check on the decoded text) gives one preference pair (correct ≻ incorrect) for a bounded buffer. Every
`rm_retrain_every` steps, `rm_retrain_steps` Bradley–Terry updates run on batches of `rm_batch_size`
pairs: a `rm_replay_fraction` share (default 10 %) drawn from the historical pairs the `rm` stage
trained on, the rest from the buffer (historical pairs fill in while the buffer is short). The reward
model lives in `TrainState.reward_params["reward_model"]`, its AdamW state in `TrainState.aux`, the
buffer in the checkpoint's stage state, and every draw is seeded by the step: a resume is exact.

Several processes: each judges its own rollout rows, but a group may span processes and every process
builds the same retraining batches from the buffer, so every process needs the same pairs. They get
them with two small gathers (`sharding.allgather_objects`): each row's (correct, verifiable) flags,
from which every process picks the same rows, then the texts of just the picked rows (two per
pair), not every row's text.
"""

from __future__ import annotations

import collections

import jax
import numpy as np
import optax

from grpo_jax import sharding
from grpo_jax.data.preferences import tokenize_preference_pair
from grpo_jax.training.evaluator import CORRECTNESS
from grpo_jax.training.preference_steps import make_rm_step
from grpo_jax.training.state import OptimizerConfig, TrainState, make_optimizer

PAIR_KEYS = tuple(
    f"{side}_{part}" for side in ("chosen", "rejected") for part in ("tokens", "attention_mask", "loss_mask")
)


def pair_rows(correct: list[bool], verifiable: list[bool], group_size: int) -> list[tuple[int, int]]:
    """(chosen, rejected) rows: the first correct and first incorrect row of every verifiable group of
    `group_size` consecutive rows that has both, in group order."""
    pairs = []
    for start in range(0, len(correct), group_size):
        rows = range(start, start + group_size)
        if not verifiable[start]:
            continue
        good = [i for i in rows if correct[i]]
        bad = [i for i in rows if not correct[i]]
        if good and bad:
            pairs.append((good[0], bad[0]))
    return pairs


def pairs_from_groups(
    texts: list[str], examples: list[dict], correct: list[bool], group_size: int
) -> list[dict]:
    """One (first correct ≻ first incorrect) pair per group of verifiable rows that has both."""
    verifiable = [e.get("route", "verifiable") == "verifiable" for e in examples]
    return [
        {"prompt": examples[good]["prompt"], "chosen": texts[good], "rejected": texts[bad]}
        for good, bad in pair_rows(correct, verifiable, group_size)
    ]


class RewardModelRetrainer:
    """The retraining half of iterative GRPO for one `grpo` stage (see the module docstring)."""

    def __init__(self, stage, history: list[dict], rm_shardings):
        run, sc = stage.run, stage.config
        self.run, self.config, self.history = run, sc, history
        self.every, self.steps = sc.rm_retrain_every, sc.get("rm_retrain_steps", 4)
        self.batch_size = sc.get("rm_batch_size", 16)
        self.replay_fraction = sc.get("rm_replay_fraction", 0.1)
        self.buffer = collections.deque(maxlen=sc.get("rm_buffer_size", 256))
        self.correct = CORRECTNESS[run.task.correctness]
        self.optimizer = make_optimizer(
            OptimizerConfig(learning_rate=sc.get("rm_learning_rate", 1e-5), total_steps=max(sc.steps, 1))
        )
        self.max_len = sc.get("rm_max_len", 0) or run.config[sc.reward_model_from].max_len
        self.rm_shardings = rm_shardings
        self.replicated = sharding.replicated(run.mesh)

    def aux(self, rm_params):
        """({"rm_opt_state": ...}, its shardings) for `create_train_state(aux=..., aux_shardings=...)`."""
        shapes = jax.eval_shape(self.optimizer.init, rm_params)
        opt_shardings = optax.tree_map_params(
            self.optimizer,
            lambda _, s: s,
            shapes,
            self.rm_shardings,
            transform_non_params=lambda _: self.replicated,
        )
        opt_state = jax.jit(self.optimizer.init, out_shardings=opt_shardings)(rm_params)
        temp = TrainState(
            step=self.replicated,
            params=self.rm_shardings,
            opt_state=opt_shardings,
            ref_params=None,
            reward_params={},
            rng=self.replicated,
            aux={},
        )
        self.step_fn = make_rm_step(
            self.run.model_config, self.optimizer, mesh=self.run.mesh, state_shardings=temp, donate=False
        )
        return {"rm_opt_state": opt_state}, {"rm_opt_state": opt_shardings}

    def observe(self, rows, texts: list[str], examples: list[dict], group_size: int) -> None:
        """Add the pairs of a rollout's groups to the buffer. rows: this process's global row numbers,
        texts and examples: those rows' (see the module docstring; a collective with several processes)."""
        rows = [int(r) for r in rows]
        judged = {
            r: (bool(self.correct(t, e)), e.get("route", "verifiable") == "verifiable")
            for r, t, e in zip(rows, texts, examples, strict=True)
        }
        for part in sharding.allgather_objects(judged):
            judged.update(part)
        order = range(len(judged))
        pairs = pair_rows([judged[r][0] for r in order], [judged[r][1] for r in order], group_size)
        wanted = {r for pair in pairs for r in pair}
        mine = {r: (t, e["prompt"]) for r, t, e in zip(rows, texts, examples) if r in wanted}
        found = {}
        for part in sharding.allgather_objects(mine):
            found.update(part)
        self.buffer.extend(
            {"prompt": found[good][1], "chosen": found[good][0], "rejected": found[bad][0]}
            for good, bad in pairs
        )

    def extra_state(self) -> dict:
        return {"rm_buffer": list(self.buffer)}

    def load_extra_state(self, extra: dict) -> None:
        self.buffer.clear()
        self.buffer.extend(extra.get("rm_buffer", []))

    def _batch(self, rng: np.random.Generator) -> tuple[dict, int]:
        num_replay = int(round(self.batch_size * self.replay_fraction))
        num_new = min(self.batch_size - num_replay, len(self.buffer))
        num_replay = self.batch_size - num_new
        new = (
            [self.buffer[i] for i in rng.choice(len(self.buffer), size=num_new, replace=False)]
            if num_new
            else []
        )
        old = [self.history[i] for i in rng.choice(len(self.history), size=num_replay)]
        rows = [
            tokenize_preference_pair(p, self.run.tokenizer, self.run.config.template, self.max_len)
            for p in new + old
        ]
        batch = {k: np.stack([r[k] for r in rows]) for k in PAIR_KEYS}
        # Every process drew the same pairs: the batch is global, each process places its rows of it.
        return sharding.place_global(batch, self.run.mesh), num_new

    def maybe_retrain(self, state, step: int) -> tuple[TrainState, dict]:
        """After RL step `step`: every `every` steps, update the reward model; returns (state, metrics)."""
        if step % self.every:
            return state, {}
        rm_state = TrainState(
            step=state.step,
            params=state.reward_params["reward_model"],
            opt_state=state.aux["rm_opt_state"],
            ref_params=None,
            reward_params={},
            rng=state.rng,
            aux={},
        )
        before = rm_state.params
        metrics, new_pairs = [], 0
        for k in range(self.steps):
            batch, num_new = self._batch(np.random.default_rng([self.run.config.seed, step, k]))
            rm_state, m = self.step_fn(rm_state, batch)
            metrics.append(jax.device_get(m))
            new_pairs += num_new
        delta = optax.tree.norm(jax.tree_util.tree_map(lambda a, b: a - b, rm_state.params, before))
        state = state.replace(
            reward_params={**state.reward_params, "reward_model": rm_state.params},
            aux={**state.aux, "rm_opt_state": rm_state.opt_state},
        )
        return state, {
            "rm_retrain/loss": float(np.mean([m["loss"] for m in metrics])),
            "rm_retrain/accuracy": float(np.mean([m["rm/accuracy"] for m in metrics])),
            "rm_retrain/new_pairs": float(new_pairs),
            "rm_retrain/replay_pairs": float(self.steps * self.batch_size - new_pairs),
            "rm_retrain/param_delta": float(delta),
            "rm_retrain/buffer_size": float(len(self.buffer)),
        }
