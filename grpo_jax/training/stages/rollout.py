"""What the RL stages share (`grpo`, `ppo`, `rejection_sampling`): prompt data, the sampler, host rewards
and a reward model's params. A subclass adds its algorithm's state and step (`build`, `algo`) and may
override `collect` (e.g. dynamic sampling with refill) or `host_batch_extras`.

Host-side work on a rollout (decoding, host rewards, step rewards) runs on every process over ITS OWN
rows only (`LocalRollout`: the rows its devices hold, with their global row numbers; on a pod these need
not be one contiguous block), each row's example found through the prompt batch's `example_index`,
placed on the mesh with the prompts; the per-row results go back into the batch layout
(`sharding.from_local_rows`) and logged means are taken over the global batch (`global_mean`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time

import jax
import numpy as np
from absl import logging

from grpo_jax import sharding
from grpo_jax.data.pipeline import make_prompt_dataset, prompt_length_stats
from grpo_jax.rewards import HOST_REWARDS, HostRewardRunner, TokenSpec, make_reward_fns
from grpo_jax.training import setup
from grpo_jax.training.grpo_step import rollout_to_batch
from grpo_jax.training.stages.base import Stage, host_metrics, stage_kind

PROMPT_KEYS = ("prompt_tokens", "prompt_mask", "answer_tokens", "answer_mask", "route", "example_index")


@dataclasses.dataclass(frozen=True)
class LocalRollout:
    """This process's rows of a rollout of `num_rows` rows (N = B * G, prompt-major).

    rows int64 [n]: their global row numbers, ascending; tokens, mask [n, L]; truncated bool [n];
    example_index int [n]: each row's example (an index into the stage's `examples`).
    """

    rows: np.ndarray
    tokens: np.ndarray
    mask: np.ndarray
    truncated: np.ndarray
    example_index: np.ndarray
    num_rows: int


def local_rollout(rollout, placed: dict, num_samples: int, mesh, devices=None) -> LocalRollout:
    """Read this process's rows of `rollout` (see `sharding.local_rows`; `devices` stands in for a
    process in tests) and look up their examples: row r is sample r % G of prompt r // G, whose
    `example_index` is read from the placed prompt batch `placed` in the same batch layout (a device
    holding rollout rows [kN/D, (k+1)N/D) holds prompts [kB/D, (k+1)B/D), so no row is missing)."""
    rows, (tokens, mask, truncated) = sharding.local_rows(
        (rollout.tokens, rollout.mask, rollout.truncated), mesh, devices
    )
    prompt_rows, example_index = sharding.local_rows(placed["example_index"], mesh, devices)
    prompt_of_row = rows // num_samples
    at = np.minimum(np.searchsorted(prompt_rows, prompt_of_row), len(prompt_rows) - 1)
    if not np.array_equal(prompt_rows[at], prompt_of_row):
        raise RuntimeError("the rollout's rows and its prompts are not laid out alike on this process")
    return LocalRollout(rows, tokens, mask, truncated, example_index[at], int(rollout.tokens.shape[0]))


def global_mean(values) -> float:
    """The mean of per-row (or per-prompt) values over every process's rows: the global batch's."""
    values = np.asarray(values, np.float64)
    totals = sharding.sum_over_processes({"sum": float(values.sum()), "count": float(values.size)})
    return totals["sum"] / totals["count"]


def route_examples(examples: list[dict], open_fraction: float) -> list[dict]:
    """Mark a stable `open_fraction` of the examples `route="open"` (scored by the reward model only),
    the rest "verifiable"; chosen by a hash of the prompt, so the split does not depend on order."""
    if not open_fraction:
        return examples

    def is_open(prompt: str) -> bool:
        digest = hashlib.blake2b(prompt.encode(), digest_size=8, person=b"grpo_jax_route").digest()
        return int.from_bytes(digest, "little") < open_fraction * 2**64

    return [dict(e, route="open" if is_open(e["prompt"]) else "verifiable") for e in examples]


class RolloutStage(Stage):
    """Shared by the RL stages: prompt data, sampling, host rewards, reward-model params."""

    batch_field = "prompts_per_step"
    # The stage can train on partial rollouts (`config.engine.rollout_token_budget`).
    partial_rollouts = False
    # The stage can pipeline its rollouts `config.<stage>.off_policy_steps` ahead of its updates.
    pipelines = False
    # Trainer params -> the sampler (`grpo_jax.rollout.weight_sync`), built on first use; and the last
    # policy version pushed (its `bytes` and `time_s` are logged as `sync/*`).
    _weight_sync = None
    last_sync = None

    @classmethod
    def validate(cls, config, name):
        sc = config[name]
        setup.check_reference_dtype(config, name)
        source = sc.get("reward_model_from", "")
        if source:
            stages = list(config.stages)
            if source not in stages[: stages.index(name)] or stage_kind(source) != "rm":
                raise ValueError(
                    f"config.{name}.reward_model_from={source!r} must name an earlier 'rm' stage "
                    f"(stages: {stages})"
                )
        if not 0.0 <= sc.get("open_fraction", 0.0) < 1.0:
            raise ValueError(f"config.{name}.open_fraction must be in [0, 1), got {sc.open_fraction}")
        steps = setup.off_policy_steps(config, name)
        if steps and not cls.pipelines:
            raise ValueError(
                f"config.{name}.off_policy_steps={steps}: only 'grpo' stages pipeline their rollouts, and "
                f"stage {name!r} ({stage_kind(name)}) samples on-policy; set it to 0 or drop it"
            )
        lora, shape = setup.stage_lora(config, name), setup.sampler_mesh_setting(config)
        if shape is not None and sc[cls.batch_field] % shape[0]:
            raise ValueError(
                f"config.{name}.{cls.batch_field}={sc[cls.batch_field]} must be divisible by the sampler's "
                f"replicas (config.sampler_mesh={shape}: {shape[0]})"
            )
        if shape is not None and lora is not None and lora.sampler_weights != "merged":
            raise ValueError(
                f"config.sampler_mesh with config.{name}.lora=True needs config.lora.sampler_weights="
                f"'merged' (the sampler mesh holds plain weights), got {lora.sampler_weights!r}"
            )
        budget = setup.rollout_token_budget(config)
        env = setup.stage_env(config, name)
        if env is not None:
            if stage_kind(name) not in ("grpo", "ppo"):
                raise ValueError(
                    f"config.{name}.env={env.env!r}: multi-turn tool use trains 'grpo' and 'ppo' stages, "
                    f"and stage {name!r} is a {stage_kind(name)!r} stage"
                )
            steps = config[name].get("off_policy_steps", 0)
            sampler_mesh = config.get("sampler_mesh", None)
            if budget or steps or sampler_mesh:
                raise ValueError(
                    f"config.{name}.env={env.env!r} decodes whole multi-turn rollouts on the trainer's "
                    f"mesh for now: drop config.engine.rollout_token_budget={budget}, "
                    f"config.{name}.off_policy_steps={steps} and config.sampler_mesh={sampler_mesh}"
                )
        if budget and not cls.partial_rollouts:
            raise ValueError(
                f"config.engine.rollout_token_budget={budget}: partial rollouts train only 'grpo' stages, "
                f"and stage {name!r} ({stage_kind(name)}) samples whole rollouts; set it to 0 or drop it"
            )
        cls.algo(sc)

    @staticmethod
    def algo(stage_config):
        raise NotImplementedError

    def build_data(self):
        run, sc = self.run, self.config
        self.examples = route_examples(setup.stage_task(run, self.name).train, sc.get("open_fraction", 0.0))
        logging.info(
            "[%s] %s",
            self.name,
            prompt_length_stats(
                self.examples,
                run.tokenizer,
                template=run.config.template,
                max_prompt_len=run.config.max_prompt_len,
            ),
        )
        self.data_iter = iter(
            make_prompt_dataset(
                self.examples,
                run.tokenizer,
                template=run.config.template,
                max_prompt_len=run.config.max_prompt_len,
                batch_size=self.generation_batch_size(),
                seed=run.config.seed + self.index,
                max_answer_len=run.config.max_answer_len,
                shard_index=jax.process_index(),
                shard_count=jax.process_count(),
            )
        )

    def generation_batch_size(self) -> int:
        """Prompts per sampled batch (global): `prompts_per_step`; more with dynamic-sampling refill."""
        return self.config.prompts_per_step

    def reward_params(self):
        """({"reward_model": params} or {}, shardings or None) for TrainState.reward_params."""
        source = self.config.get("reward_model_from", "")
        if not source:
            return {}, None
        params, shardings = self.run.load_result(source)
        return {"reward_model": params}, {"reward_model": shardings}

    def in_graph_rewards(self):
        specs = [tuple(r) for r in self.config.rewards]
        if not specs:
            return None
        token_spec = TokenSpec.from_tokenizer(self.run.tokenizer)
        return make_reward_fns(
            specs, token_spec, tokenizer=self.run.tokenizer, model_config=self.run.model_config
        )

    def build_host_rewards(self):
        """Weighted Python rewards between sampler and step: sets self.host_rewards (or None)."""
        specs = [tuple(s) for s in self.config.host_rewards]
        self.host_runner = None
        self.host_rewards = None
        if not specs:
            return
        unknown = [s[0] for s in specs if s[0] not in HOST_REWARDS]
        if unknown:
            raise ValueError(f"host_rewards: unknown reward(s) {unknown}; known: {sorted(HOST_REWARDS)}")
        self.host_runner = HostRewardRunner(
            {s[0]: HOST_REWARDS[s[0]] for s in specs}, timeout_s=self.config.host_reward_timeout_s
        )
        weights = {s[0]: float(s[1]) for s in specs}

        def compute(texts, examples):
            """(weighted total float32 [n] of these rows, logged metrics of the GLOBAL batch: each
            reward's mean and the error / time-out counts summed over processes). Collective."""
            rewards, stats = self.host_runner(texts, examples)
            total = sum(weights[k] * v for k, v in rewards.items())
            totals = sharding.sum_over_processes(
                {
                    **{f"host_reward/{k}": float(np.sum(v, dtype=np.float64)) for k, v in rewards.items()},
                    "host_reward_errors": stats["num_errors"],
                    "host_reward_timeouts": stats["num_timeouts"],
                    "rows": len(texts),
                }
            )
            rows = totals.pop("rows")
            logged = {k: v / rows if k.startswith("host_reward/") else v for k, v in totals.items()}
            return np.asarray(total, np.float32), logged

        self.host_rewards = compute

    def local_rollout(self, rollout, placed, num_samples: int) -> LocalRollout:
        """This process's rows of `rollout` and their examples (`local_rollout`)."""
        return local_rollout(rollout, placed, num_samples, self.run.mesh)

    def decode(self, local: LocalRollout) -> list[str]:
        """The completion text of each of these rows (EOS dropped)."""
        eos = self.run.tokenizer.eos_id
        return [
            self.run.tokenizer.decode([i for i in t[m > 0].tolist() if i != eos])
            for t, m in zip(local.tokens, local.mask)
        ]

    def examples_of(self, local: LocalRollout) -> list[dict]:
        """The example of each of these rows."""
        return [self.examples[int(i)] for i in local.example_index]

    # -- the sampler's side (docs/ARCHITECTURE.md, "Asynchronous GRPO") ------------------------------

    @property
    def sampler_mesh(self):
        """Where rollouts decode: `config.sampler_mesh`'s own mesh, or the trainer's (co-located)."""
        return self.run.sampler_mesh if self.run.sampler_mesh is not None else self.run.mesh

    def weight_sync(self):
        """The stage's `WeightSync` onto the sampler mesh (or, co-located, a copy on the trainer mesh)."""
        if self._weight_sync is None:
            from grpo_jax.rollout.weight_sync import WeightSync

            self._weight_sync = WeightSync(self.run.model_config, self.run.sampler_mesh)
        return self._weight_sync

    def sampler_side_params(self, state, version: int | None = None, *, wait: bool = True):
        """What the sampler decodes with for this state: `sampler_params(state)`, on a sampler mesh cast
        and moved there (`WeightSync.push`; recorded in `last_sync`). `version` defaults to state.step."""
        params = self.sampler_params(state)
        if self.run.sampler_mesh is None:
            return params
        version = int(state.step) if version is None else version
        self.last_sync = self.weight_sync().push(params, version, wait=wait)
        return self.last_sync.params

    def sync_metrics(self) -> dict[str, float]:
        """`sync/bytes` and `sync/time_s` of the last push (empty when nothing was pushed)."""
        if self.last_sync is None:
            return {}
        return {"sync/bytes": float(self.last_sync.bytes), "sync/time_s": self.last_sync.time_s}

    def to_trainer(self, rollout):
        """A rollout decoded on the sampler mesh, moved into the trainer mesh's batch layout (rows over
        ("data", "fsdp")); unchanged when co-located."""
        if self.run.sampler_mesh is None:
            return rollout
        mesh = self.run.mesh
        if jax.process_count() == 1:
            return jax.tree_util.tree_map(
                lambda x: jax.device_put(
                    x, sharding.batch_sharding(mesh, x.ndim) if x.ndim else sharding.replicated(mesh)
                ),
                rollout,
            )
        # Several processes: JAX does not copy between disjoint device sets there. Each process holds the
        # same rows on both meshes (`setup.build_meshes` checks it), so it reads its rows from its sampler
        # chips and places them on its trainer chips (a few MB per step: tokens, logprobs, masks).
        from grpo_jax.rollout.weight_sync import move_to

        leaves, treedef = jax.tree_util.tree_flatten(rollout)
        rows_of = [x for x in leaves if x.ndim]
        rows, values = sharding.local_rows(rows_of, self.run.sampler_mesh)
        placed = iter(sharding.from_local_rows(values, rows, mesh, rows_of[0].shape[0]))
        return jax.tree_util.tree_unflatten(
            treedef, [next(placed) if x.ndim else move_to(x, sharding.replicated(mesh)) for x in leaves]
        )

    def sampler_key(self, rng):
        """`rng` (a key of the trainer state's, on the trainer's mesh) as a replicated copy on the sampler
        mesh; itself when co-located."""
        if self.run.sampler_mesh is None:
            return rng
        from grpo_jax.rollout.weight_sync import move_to

        impl = jax.random.key_impl(rng)
        return jax.random.wrap_key_data(
            move_to(jax.random.key_data(rng), sharding.replicated(self.run.sampler_mesh)), impl=impl
        )

    def dispatch_rollout(self, params, prompts, num_samples: int, temperature: float, rng):
        """The sampler's Rollout of `prompts` under `params` (already on the sampler's side), dispatched
        on the sampler mesh and not waited for (JAX dispatch is asynchronous)."""
        mesh = self.sampler_mesh
        placed = sharding.shard_batch({k: prompts[k] for k in ("prompt_tokens", "prompt_mask")}, mesh)
        return setup.sampler_fn(self.run.config)(  # config.sampler: "static" or "engine"
            self.run.model_config,
            params,
            placed["prompt_tokens"],
            placed["prompt_mask"],
            self.sampler_key(rng),
            **self.sampling_kwargs(num_samples, temperature),
            mesh=mesh,
        )

    def sampling_kwargs(self, num_samples: int, temperature: float) -> dict:
        """The stage's sampling settings in `sampling.generate`'s keywords (besides the mesh)."""
        return dict(
            num_samples=num_samples,
            max_new_tokens=self.run.config.max_new_tokens,
            min_new_tokens=self.config.get("min_new_tokens", 0),
            temperature=temperature,
            top_p=self.config.top_p,
            top_k=self.config.top_k,
            eos_id=self.run.tokenizer.eos_id,
            pad_id=self.run.tokenizer.pad_id,
        )

    # Multi-turn rollouts with the stage's tools (`config.<stage>.env`; `grpo_jax.rollout.turns`), or None.
    turn_sampler = None

    def build_turns(self):
        """The stage's `TurnSampler` when its section sets an `env` (its environments' worker processes
        start here)."""
        env = setup.stage_env(self.run.config, self.name)
        if env is not None:
            self.turn_sampler = setup.turn_sampler(self.run.config, env, self.run.tokenizer)

    def rollout(self, state, prompts, num_samples: int, temperature: float, rng=None):
        """(prompt batch placed on the mesh, sampler Rollout); rng defaults to fold_in(state.rng, step).
        The placed batch carries `example_index`, so each rollout row's example is read from the same
        global layout as its tokens (`local_rollout`). With a `config.sampler_mesh` the rollout decodes
        there and is returned in the trainer mesh's batch layout. With the stage's tools: multi-turn
        rollouts whose environments start on the rows' examples (final rewards: `turn_sampler.rewards`)."""
        placed = sharding.shard_batch({k: prompts[k] for k in PROMPT_KEYS}, self.run.mesh)
        params = self.rollout_params if self.rollout_params is not None else self.sampler_side_params(state)
        rng = jax.random.fold_in(state.rng, state.step) if rng is None else rng
        if self.run.sampler_mesh is not None:
            rollout = self.dispatch_rollout(params, prompts, num_samples, temperature, rng)
            return placed, self.to_trainer(rollout)
        sample, extra = setup.sampler_fn(self.run.config), {}  # config.sampler: "static" or "engine"
        if self.turn_sampler is not None:
            sample = self.turn_sampler
            index = np.asarray(prompts["example_index"])
            extra["examples"] = [self.examples[int(i)] for i in index for _ in range(num_samples)]
        rollout = sample(
            self.run.model_config,
            params,
            placed["prompt_tokens"],
            placed["prompt_mask"],
            rng,
            **self.sampling_kwargs(num_samples, temperature),
            mesh=self.run.mesh,
            **extra,
        )
        return placed, rollout

    def host_batch_extras(self, rollout, placed, num_samples: int) -> tuple[dict, dict]:
        """Host-computed batch entries (host rewards), global arrays in the batch layout, and their logged
        metrics; every process scores its own rows (see the module docstring)."""
        if self.host_rewards is None and self.turn_sampler is None:
            return {}, {}
        local = self.local_rollout(rollout, placed, num_samples)
        values, logged = None, {}
        if self.host_rewards is not None:
            values, logged = self.host_rewards(self.decode(local), self.examples_of(local))
        values, logged = self.with_env_rewards(values, logged, local)
        return {"host_rewards": self.to_batch(values, local)}, logged

    def with_env_rewards(self, values, logged: dict, local: LocalRollout):
        """Host reward values of `local`'s rows plus their environments' final rewards, and the logged
        metrics plus the tool and turn counters (unchanged without the stage's tools). One process:
        every row is local."""
        turns = self.turn_sampler
        if turns is None:
            return values, logged
        env = turns.rewards[local.rows]
        values = env if values is None else np.asarray(values, np.float32) + env
        logged = dict(logged, **turns.stats)
        return np.asarray(values, np.float32), logged

    def to_batch(self, tree, local: LocalRollout):
        """Per-row host values of `local`'s rows ([n, ...] leaves) as global arrays in the batch layout."""
        return sharding.from_local_rows(tree, local.rows, self.run.mesh, local.num_rows)

    def sample_batch(self, state, prompts, rng=None) -> tuple[dict, dict, float]:
        """(the step's batch for these prompts, host-logged metrics, seconds the sampler took)."""
        t0 = time.time()
        G = self.num_samples
        placed, rollout = self.rollout(state, prompts, G, self.temperature, rng)
        jax.block_until_ready(rollout.tokens)
        sample_time = time.time() - t0
        extras, logged = self.host_batch_extras(rollout, placed, G)
        batch = rollout_to_batch(rollout, placed, G, extras.pop("host_rewards", None))
        batch.update(extras)
        return batch, logged, sample_time

    def collect(self, state, global_step) -> tuple[dict, dict]:
        """(the step's batch, host-logged metrics incl. `sample_time_s`): one prompt batch, sampled."""
        del global_step
        prompts = next(self.data_iter)
        batch, logged, sample_time = self.sample_batch(state, prompts)
        return batch, dict(
            logged,
            sample_time_s=sample_time,
            prompt_truncated_frac=global_mean(prompts["prompt_truncated"]),
        )

    # The sampler's params for the current step's rollouts (LoRA: merged once per step, however many
    # rounds `collect` samples), dropped before the update so a merged copy is not held through it.
    rollout_params = None

    def collect_state(self, state, global_step) -> tuple[object, dict, dict]:
        """(state, the step's batch, host-logged metrics): `collect`, for stages whose sampling carries
        state from step to step in the TrainState (partial rollouts)."""
        batch, logged = self.collect(state, global_step)
        return state, batch, logged

    def train_step(self, state, global_step):
        t0 = time.time()
        self.rollout_params = self.sampler_side_params(state)
        try:
            state, batch, logged = self.collect_state(state, global_step)
        finally:
            self.rollout_params = None
        batch.update(self.debug_switches(global_step))
        state, step_metrics = self.step_fn(state, batch)
        state, more = self.after_update(state)
        m = host_metrics(step_metrics)
        m.update(logged, **more, **self.sync_metrics(), step_time_s=time.time() - t0)
        return state, m

    def after_update(self, state):
        """Work between steps (reference reset, reward-model retraining): (state, extra metrics)."""
        return state, {}

    def progress(self, metrics):
        return {"reward": metrics["reward/mean"], "kl": metrics["kl"]}

    def close(self):
        if getattr(self, "host_runner", None) is not None:
            self.host_runner.close()
        if self.turn_sampler is not None:
            self.turn_sampler.close()
