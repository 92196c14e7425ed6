"""`grpo` stages: sample G completions per prompt with the jitted sampler, score them (in-graph rule
rewards, a learned reward model, Python host rewards, process step rewards), and run the one-program
GRPO update (DeepSeekMath arXiv 2402.03300 eq. 3). The rollout half (`RolloutStage`) is shared with the
`ppo` and `rejection_sampling` stages.

Stage options besides the optimizer's: `rewards` (in-graph, weighted, optionally routed with
`"on": "verifiable" | "open"`), `host_rewards`, `reward_model_from` (an `rm` stage whose params go into
`TrainState.reward_params["reward_model"]` for the `reward_model` reward), `open_fraction` (share of
the prompts routed "open": R1's all-scenario RL), `step_verifier` (for `advantage_estimator="process"`),
`task` (a task section of its own instead of the run's), `top_p`, `top_k`; iterative GRPO: the
algorithm's `reference_reset_every`, and `rm_retrain_every` (+ `rm_retrain_steps`, `rm_batch_size`,
`rm_replay_fraction`, `rm_learning_rate`, `rm_buffer_size`) to keep training the reward model on the
policy's own samples with 10 % replay (see `rm_retrain.py`). With `config.engine.rollout_token_budget`
> 0 the stage trains on partial rollouts (`collect_partial`; docs/ARCHITECTURE.md "Partial rollouts");
with `off_policy_steps` = k >= 1 it pipelines its rollouts up to k updates ahead (`pipelined_step`), on
`config.sampler_mesh`'s devices when there is one (docs/ARCHITECTURE.md "Asynchronous GRPO"). Both, or
partial rollouts with a sampler mesh: the engine is the sampler's, its calls run up to k steps ahead of
the updates and a trained group's oldest token is at most k + (steps it was carried) updates old
(`pipelined_partial_step`; docs/ARCHITECTURE.md "Partial rollouts in the pipeline").
"""

from __future__ import annotations

import collections
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax import sharding
from grpo_jax.algorithms import zero_variance_groups
from grpo_jax.rollout.partial import PartialRollouts, stage_payload_shapes
from grpo_jax.rollout.turns import merge_turn_stats
from grpo_jax.rollout.weight_sync import SyncedParams
from grpo_jax.training import refill, setup
from grpo_jax.training.grpo_step import make_grpo_step, outcome_rewards, rollout_to_batch
from grpo_jax.training.pipeline import (
    InFlight,
    InflightDataIterator,
    check_lag,
    check_partial_lag,
    oldest_versions,
)
from grpo_jax.training.stages.base import host_metrics, register_stage
from grpo_jax.training.stages.rm_retrain import RewardModelRetrainer
from grpo_jax.training.stages.rollout import PROMPT_KEYS, RolloutStage, global_mean
from grpo_jax.training.state import (
    create_train_state,
    learning_rate_schedule,
    make_optimizer,
    reset_reference,
)


def _wait_for_rollout(item: InFlight, tokens) -> tuple[float, float]:
    """Block until the rollout `item` (whose `tokens` are its last output) is done: (seconds waited now,
    seconds since it was dispatched)."""
    wait_from = time.time()
    jax.block_until_ready(tokens)
    ready_at = time.time()
    return ready_at - wait_from, ready_at - item.dispatched_at


@functools.cache
def oldest_versions_fn(num_samples: int):
    """`pipeline.oldest_versions` jitted for groups of `num_samples`."""
    return jax.jit(functools.partial(oldest_versions, num_samples=num_samples))


@register_stage("grpo")
class GRPOStage(RolloutStage):
    trains_on_rollouts = True
    poisons_gradients = True
    partial_rollouts = True
    pipelines = True

    @classmethod
    def validate(cls, config, name):
        super().validate(config, name)
        budget = setup.rollout_token_budget(config)
        sc, grpo = config[name], cls.algo(config[name])
        steps = setup.off_policy_steps(config, name)
        if steps:
            where = f"config.{name}.off_policy_steps={steps} trains on rollouts of older params"
            if grpo.is_correction == "none" and grpo.old_logprobs_source != "trainer":
                raise ValueError(
                    f"{where}: set config.{name}.algo.is_correction='token_tis' (decoupled PPO: π_prox "
                    f"recomputed by the trainer, weight π_prox/π_behaviour) or config.{name}.algo."
                    "old_logprobs_source='trainer'"
                )
            if grpo.dynamic_sampling_refill:
                raise ValueError(
                    f"{where}: its refill rounds are not pipelined; set config.{name}.algo."
                    "dynamic_sampling_refill=False (dynamic_sampling alone still weighs zero-variance "
                    "groups 0)"
                )
        if not budget:
            return
        where = f"config.engine.rollout_token_budget={budget} (partial rollouts)"
        if grpo.is_correction == "none":
            raise ValueError(
                f"{where} trains on tokens of older policies: it needs config.{name}.algo.is_correction="
                "'token_tis' (or 'seq_tis', 'icepop'), the decoupled-PPO weight π_prox/π_behaviour"
            )
        if grpo.dynamic_sampling_refill:
            raise ValueError(
                f"{where} cannot refill a batch with extra generation rounds: set "
                f"config.{name}.algo.dynamic_sampling_refill=False (dynamic_sampling alone still weighs "
                "zero-variance groups 0)"
            )
        if sc.get("rm_retrain_every", 0):
            raise ValueError(
                f"{where}: config.{name}.rm_retrain_every would learn from empty fill rows; set 0"
            )
        setup.max_inflight_groups(config, sc.prompts_per_step)

    @staticmethod
    def algo(stage_config):
        grpo = setup.grpo_config(stage_config)
        if grpo.advantage_estimator == "process" and not stage_config.get("step_verifier", ""):
            raise ValueError(
                "advantage_estimator='process' needs config.<stage>.step_verifier (e.g. 'arithmetic')"
            )
        return grpo

    def build(self, params):
        run, sc = self.run, self.config
        self.grpo = grpo = self.algo(sc)
        self.num_samples, self.temperature = grpo.num_generations, grpo.temperature
        self.build_data()
        updates_per_step = grpo.num_iterations * grpo.num_minibatches
        opt_config = setup.optimizer_config(sc, sc.steps * updates_per_step)
        optimizer = make_optimizer(opt_config)
        reward_params, reward_shardings = self.reward_params()
        aux, aux_shardings, self.retrainer = None, None, None
        if sc.get("rm_retrain_every", 0):
            history = run.stage(sc.reward_model_from).pairs()
            self.retrainer = RewardModelRetrainer(self, history, reward_shardings["reward_model"])
            aux, aux_shardings = self.retrainer.aux(reward_params["reward_model"])
        self.off_policy_steps = setup.off_policy_steps(run.config, self.name)
        self.inflight: collections.deque[InFlight] = collections.deque()
        self.sampler_version: SyncedParams | None = None  # the newest params on the sampler's side
        self.last_taken_at = None
        # Partial rollouts with k >= 1 or a sampler mesh: the engine is the sampler's, its state held here
        # and run ahead of the updates (`pipelined_partial_step`); else it lives in the TrainState.
        self.partial_pipelined = bool(setup.rollout_token_budget(run.config)) and (
            self.off_policy_steps > 0 or run.sampler_mesh is not None
        )
        self.engine_state = None
        if self.off_policy_steps or self.partial_pipelined:
            # checkpoints record the data position before the rollouts in flight
            self.data_iter = InflightDataIterator(self.data_iter, self.inflight)
        self.partial = self.partial_engine()
        if self.partial is not None and not self.partial_pipelined:
            # the in-flight rollouts live in the TrainState: checkpoints hold them
            aux = dict(aux or {}, rollout=self.partial.init())
            aux_shardings = dict(aux_shardings or {}, rollout=self.partial.shardings)
        params, param_shardings, base = self.trainable_start(params)
        # With LoRA the reference is the base itself; only an iterative-GRPO reset needs adapters of its own.
        with_reference = grpo.kl_coef > 0 and (self.lora is None or grpo.reference_reset_every > 0)
        state, shardings = create_train_state(
            params,
            optimizer,
            run.mesh,
            param_shardings,
            rng=self.state_rng(),
            with_reference=with_reference,
            reference_dtype=sc.get("reference_dtype") or None,
            reward_params=reward_params,
            reward_param_shardings=reward_shardings,
            aux=aux,
            aux_shardings=aux_shardings,
            **base,
        )
        self.build_host_rewards()
        self.build_turns()
        self.step_verifier = None
        if grpo.advantage_estimator == "process":
            from grpo_jax.rewards.process import STEP_VERIFIERS

            if sc.step_verifier not in STEP_VERIFIERS:
                raise ValueError(
                    f"config.{self.name}.step_verifier={sc.step_verifier!r}; known: {sorted(STEP_VERIFIERS)}"
                )
            self.step_verifier = STEP_VERIFIERS[sc.step_verifier]
        reward_fn = self.in_graph_rewards()
        if grpo.dynamic_sampling_refill:
            G = grpo.num_generations
            self.refill_score = jax.jit(
                lambda batch, reward_params: zero_variance_groups(
                    outcome_rewards(reward_fn, batch, reward_params)[0], G
                )[::G]
            )
            self.refill_merge = refill.make_merge(run.mesh)
        self.step_fn = make_grpo_step(
            grpo,
            run.model_config,
            optimizer,
            reward_fn=reward_fn,
            mesh=run.mesh,
            state_shardings=shardings,
            lr_schedule=learning_rate_schedule(opt_config),
            logprob_chunk_size=run.config.logprob_chunk_size,
            grad_accum_steps=sc.get("grad_accum_steps", 1),
            shared_prefix=sc.get("shared_prefix", False),
        )
        return state, shardings

    def partial_engine(self) -> PartialRollouts | None:
        """The partial-rollout engine of `config.engine.rollout_token_budget` (None when 0). Pipelined
        (`partial_pipelined`): on the sampler's mesh, each group stored with the step whose engine call
        enqueued it (`enqueue_step`, for the staleness check)."""
        run, sc = self.run, self.config
        budget = setup.rollout_token_budget(run.config)
        if not budget:
            return None
        payload = stage_payload_shapes(run.config.max_prompt_len, run.config.max_answer_len)
        if self.partial_pipelined:
            payload["enqueue_step"] = jax.ShapeDtypeStruct((), jnp.int32)
        return PartialRollouts(
            run.model_config,
            prompts_per_step=sc.prompts_per_step,
            max_groups=setup.max_inflight_groups(run.config, sc.prompts_per_step),
            budget=budget,
            **setup.engine_settings(run.config),
            prompt_len=run.config.max_prompt_len,
            num_samples=self.num_samples,
            max_new_tokens=run.config.max_new_tokens,
            eos_id=run.tokenizer.eos_id,
            temperature=self.temperature,
            top_p=sc.top_p,
            top_k=sc.top_k,
            min_new_tokens=sc.get("min_new_tokens", 0),
            pad_id=run.tokenizer.pad_id,
            payload_shapes=payload,
            mesh=self.sampler_mesh if self.partial_pipelined else run.mesh,
        )

    def collect_state(self, state, global_step):
        if self.partial is None:
            return super().collect_state(state, global_step)
        return self.collect_partial(state)

    def collect_partial(self, state):
        """Partial rollouts (`grpo_jax.rollout.partial`): fill the engine's free group entries with prompt
        batches (one `next(data_iter)` each), decode at most the budget under this step's params (policy
        version = `state.step`) and take the B groups handed out as the batch, fill places at weight 0.
        Prompt batch r of the step samples with fold_in(step key, r) (r = 0: the step key itself)."""
        t0 = time.time()
        B, G, rollouts = self.config.prompts_per_step, self.num_samples, self.partial
        params = self.rollout_params if self.rollout_params is not None else self.sampler_params(state)
        engine_state = state.aux["rollout"]
        step_rng = jax.random.fold_in(state.rng, state.step)
        truncated = []
        while rollouts.room(engine_state) >= B:
            prompts = next(self.data_iter)
            placed = sharding.shard_batch({k: prompts[k] for k in PROMPT_KEYS}, self.run.mesh)
            rng = step_rng if not truncated else jax.random.fold_in(step_rng, len(truncated))
            engine_state = rollouts.enqueue(engine_state, params, placed, rng, state.step)
            truncated.append(np.asarray(prompts["prompt_truncated"]))
        engine_state, out = rollouts.step(engine_state, params, state.step)
        jax.block_until_ready(out.rollout.tokens)
        sample_time = time.time() - t0
        extras, logged = self.host_batch_extras(out.rollout, out.payload, G)
        batch = rollout_to_batch(out.rollout, out.payload, G, extras.pop("host_rewards", None))
        batch.update(extras)
        batch["fill"] = jnp.repeat(out.fill, G, axis=0)
        batch["behaviour_version"] = out.version
        state = state.replace(aux={**state.aux, "rollout": engine_state})
        stats = {f"partial/{k}": v for k, v in host_metrics(out.stats).items()}
        return (
            state,
            batch,
            dict(
                logged,
                **stats,
                sample_time_s=sample_time,
                prompt_truncated_frac=global_mean(np.concatenate(truncated)) if truncated else 0.0,
                **{"partial/prompt_batches": float(len(truncated))},
            ),
        )

    def generation_batch_size(self) -> int:
        if not self.grpo.dynamic_sampling_refill:
            return super().generation_batch_size()
        return refill.generation_batch_size(
            self.config.prompts_per_step,
            self.grpo.refill_oversample,
            sharding.data_parallel_size(self.run.mesh),
        )

    def collect(self, state, global_step):
        """With `dynamic_sampling_refill` (DAPO §3.2): generation rounds of `generation_batch_size()`
        prompts until `prompts_per_step` groups with unequal rewards are in hand (or the extra rounds
        run out), then the fixed-size batch of `grpo_jax.training.refill`. Round r > 0 samples with
        fold_in(step key, r); every round takes the next prompt batch, so a resume replays them."""
        if not self.grpo.dynamic_sampling_refill:
            return super().collect(state, global_step)
        target, G = self.config.prompts_per_step, self.num_samples
        step_rng = jax.random.fold_in(state.rng, state.step)
        batches, flags, truncated, sample_time, logged, rounds_logged = [], [], [], 0.0, {}, []
        for round_ in range(self.grpo.refill_max_rounds + 1):
            prompts = next(self.data_iter)
            rng = step_rng if round_ == 0 else jax.random.fold_in(step_rng, round_)
            batch, logged, seconds = self.sample_batch(state, prompts, rng)
            rounds_logged.append(logged)
            batches.append(batch)
            flags.append(np.asarray(sharding.to_host(self.refill_score(batch, state.reward_params))))
            truncated.append(np.asarray(prompts["prompt_truncated"]))
            sample_time += seconds
            if refill.enough(flags, target):
                break
        selection = refill.select_groups(flags, target)
        return refill.merge_rounds(self.refill_merge, batches, selection, G), dict(
            logged,  # host rewards: of the last round
            **merge_turn_stats(rounds_logged),  # tool calls and time: of every round
            sample_time_s=sample_time,
            prompt_truncated_frac=global_mean(np.concatenate(truncated)),
            **{
                "refill/rounds": float(len(batches)),
                "refill/groups_sampled": float(sum(len(f) for f in flags)),
                "refill/kept_groups": float(selection.kept),
                "refill/dropped_groups": float(selection.dropped),
                "refill/fill_groups": float(selection.shortfall),
                "refill/surplus_groups": float(selection.surplus),
            },
        )

    def host_batch_extras(self, rollout, placed, num_samples):
        """Host rewards, the reward-model retrainer's new pairs and process step rewards, with this
        process's rows decoded (and their examples looked up) once for all of them."""
        turns = self.turn_sampler
        if self.host_rewards is None and self.retrainer is None and self.step_verifier is None and not turns:
            return {}, {}
        local = self.local_rollout(rollout, placed, num_samples)
        examples = self.examples_of(local)
        texts = self.decode(local) if self.host_rewards is not None or self.retrainer is not None else None
        extras, logged = {}, {}
        values = None
        if self.host_rewards is not None:
            values, logged = self.host_rewards(texts, examples)
        values, logged = self.with_env_rewards(values, logged, local)
        if values is not None:
            extras["host_rewards"] = self.to_batch(values, local)
        if self.retrainer is not None:
            self.retrainer.observe(local.rows, texts, examples, num_samples)
        if self.step_verifier is not None:
            from grpo_jax.rewards.process import process_step_rewards

            steps = process_step_rewards(
                self.run.tokenizer,
                local.tokens,
                local.mask,
                examples,
                max_steps=self.config.get("max_steps", 8),
                verifier=self.step_verifier,
            )
            extras.update(self.to_batch(steps, local))
        return extras, logged

    # -- the pipeline: config.<stage>.off_policy_steps = k >= 1 ----------------------------------------

    def train_step(self, state, global_step):
        if self.partial_pipelined:
            return self.pipelined_partial_step(state, global_step)
        if not self.off_policy_steps:
            return super().train_step(state, global_step)
        return self.pipelined_step(state, global_step)

    def push_weights(self, state, version: int, *, wait: bool) -> SyncedParams:
        """Dispatch the params of `version` to the sampler's side (`WeightSync.push`: cast, and onto the
        sampler mesh when there is one; co-located, a copy the in-flight rollouts read while the update
        donates the state). Double-buffered: the previous version stays alive while rollouts read it."""
        self.sampler_version = self.weight_sync().push(self.sampler_params(state), version, wait=wait)
        return self.sampler_version

    def dispatch(self, state, target: int) -> InFlight:
        """Take the next prompt batch and dispatch its rollout for step `target` under the sampler's
        newest params, with the key the on-policy step `target` would use: fold_in(state.rng, target)."""
        data_state = self.data_iter.snapshot()
        prompts = next(self.data_iter)
        rollout = self.dispatch_rollout(
            self.sampler_version.params,
            prompts,
            self.num_samples,
            self.temperature,
            jax.random.fold_in(state.rng, target),
        )
        return InFlight(target, self.sampler_version.version, prompts, rollout, data_state, time.time())

    def pipelined_step(self, state, global_step):
        """Step s = state.step with up to k = off_policy_steps rollouts ahead (docs/ARCHITECTURE.md,
        "Asynchronous GRPO"): (1) the rollouts of steps up to s + k (not past the stage's last step) are
        dispatched under the sampler's newest params, version s, on the sampler's devices; nothing waits
        for them; (2) the rollout of step s, dispatched up to k steps ago, is waited for, moved to the
        trainer's mesh and scored by the host rewards; (3) the update is dispatched and (4) the new params
        (version s + 1) are pushed to the sampler behind it while the sampler decodes with version s.
        Nothing in flight for step s (the stage's first step, a resume) samples it now under the current
        params: on-policy, lag 0. Asserts every trained rollout is at most k updates old."""
        t0 = time.time()
        s, k, G = int(state.step), self.off_policy_steps, self.num_samples
        sync_time = 0.0
        if self.sampler_version is None or self.sampler_version.version != s:  # first step; resume
            sync_time += self.push_weights(state, s, wait=True).time_s
        if self.inflight and self.inflight[0].target != s:
            self.inflight.clear()  # not this step's (cannot happen in one run; cheap to be sure)
        target = self.inflight[-1].target + 1 if self.inflight else s
        while target <= min(s + k, self.config.steps - 1) or not self.inflight:
            self.inflight.append(self.dispatch(state, target))
            target += 1
        item = self.inflight.popleft()
        lag = check_lag(item, s, k)
        sample_wait, sample_time = _wait_for_rollout(item, item.rollout.tokens)

        # (2) the rollout into the trainer's layout, host rewards, the batch
        placed = sharding.shard_batch({key: item.prompts[key] for key in PROMPT_KEYS}, self.run.mesh)
        rollout = self.to_trainer(item.rollout)
        extras, logged = self.host_batch_extras(rollout, placed, G)
        batch = rollout_to_batch(rollout, placed, G, extras.pop("host_rewards", None))
        batch.update(extras)
        batch["behaviour_version"] = jax.device_put(
            np.full(rollout.tokens.shape, item.version, np.int32), sharding.batch_sharding(self.run.mesh, 2)
        )
        batch.update(self.debug_switches(global_step))

        # (3) the update; (4) the next version to the sampler, queued behind it
        state, m, more, synced, train_time = self.update_and_push(state, batch, s)
        m.update(
            logged,
            **more,
            prompt_truncated_frac=global_mean(item.prompts["prompt_truncated"]),
            **self.pipeline_metrics(synced, train_time, lag, sample_wait, sample_time, sync_time, t0),
        )
        return state, m

    def update_and_push(self, state, batch, s: int, behind_update=None):
        """The update of step s (then `after_update`), then `behind_update(state)` (dispatches queued
        behind it), then θ_{s+1} pushed to the sampler and waited for: (state, the update's host
        metrics, `after_update`'s, the push's `SyncedParams` with its `time_s`, the update's seconds)."""
        train_from = time.time()
        state, step_metrics = self.step_fn(state, batch)
        state, more = self.after_update(state)
        if behind_update is not None:
            behind_update(state)
        synced = self.push_weights(state, s + 1, wait=False)
        m = host_metrics(step_metrics)
        train_time = time.time() - train_from
        sync_from = time.time()
        jax.block_until_ready(synced.params)
        synced.time_s = time.time() - sync_from
        return state, m, more, synced, train_time

    def pipeline_metrics(self, synced, train_time, lag: int, sample_wait, sample_time, sync_time, t0) -> dict:
        """The timings, the weight sync's and the pipeline's per-step metrics (docs/CONTRACTS.md) of a
        pipelined step begun at `t0`: `synced` and `train_time` from `update_and_push`; `sync_time`: a
        wait for the weights before the step."""
        return {
            "sample_time_s": sample_time,
            "train_time_s": train_time,
            "sync_time_s": sync_time + synced.time_s,
            "step_time_s": time.time() - t0,
            "sync/bytes": float(synced.bytes),
            "sync/time_s": synced.time_s,
            "pipeline/lag": float(lag),
            "pipeline/sample_wait_time_s": sample_wait,
            # 1: the trainer waited on the rollout (the sampler binds); 0: it was ready (the trainer binds)
            "pipeline/sampler_bound": float(sample_wait > 0.05 * max(train_time, 1e-3)),
            "pipeline/inflight": float(len(self.inflight)),
        }

    # -- partial rollouts in the pipeline: engine.rollout_token_budget with k >= 1 or a sampler mesh -----

    def dispatch_partial(self, state, target: int) -> InFlight:
        """Dispatch the partial-rollout engine call of step `target` under the sampler's newest params
        (version v): while every data shard has room for a prompt batch, enqueue the next one (its groups
        tagged `enqueue_step` = target; batch r samples with fold_in(fold_in(state.rng, target), r), r = 0:
        the step key itself, as `collect_partial`), then decode at most the budget and hand out B group
        places. The engine state it continues is the previous call's: reading its room waits for that
        call (the host blocks, the devices do not). Nothing waits for this one."""
        rollouts, B = self.partial, self.config.prompts_per_step
        synced, data_state = self.sampler_version, self.data_iter.snapshot()
        step_rng = self.sampler_key(jax.random.fold_in(state.rng, target))
        st, truncated = self.engine_state, []
        while rollouts.room(st) >= B:
            prompts = next(self.data_iter)
            batch = {k: prompts[k] for k in PROMPT_KEYS}
            batch["enqueue_step"] = np.full(len(prompts["prompt_tokens"]), target, np.int32)
            placed = sharding.shard_batch(batch, self.sampler_mesh)
            rng = step_rng if not truncated else jax.random.fold_in(step_rng, len(truncated))
            st = rollouts.enqueue(st, synced.params, placed, rng, synced.version)
            truncated.append(np.asarray(prompts["prompt_truncated"]))
        self.engine_state, out = rollouts.step(st, synced.params, synced.version)
        taken = {"prompt_truncated": truncated}
        return InFlight(target, synced.version, taken, out, data_state, time.time())

    def pipelined_partial_step(self, state, global_step):
        """Step s = state.step with partial rollouts, their engine on the sampler's side (the sampler mesh,
        or co-located a cast copy of the params) and its calls up to k = off_policy_steps steps ahead
        (docs/ARCHITECTURE.md, "Partial rollouts in the pipeline"). The engine call of step t (enqueue,
        decode <= budget, hand out: `dispatch_partial`) runs under the sampler's newest params when it is
        dispatched, version v_t with t − k <= v_t <= t (`check_lag`); a group carried c calls is trained
        with its oldest token at most k + c updates old (`check_partial_lag`). The order: (1) at the
        stage's first step or a resume, θ_s to the sampler and an empty engine; (2) the call of step s
        (dispatched now when nothing is in flight: lag 0) is waited for; (3) the call of step s + 1 is
        dispatched (its room reads call s's state, done); (4) host rewards, the batch and the update;
        (5) the calls up to s + k behind it, each waiting on the host for the one before while the
        update runs; (6) θ_{s+1} to the sampler. k = 0 with a sampler mesh: one call per step, on-policy.
        """
        t0 = time.time()
        s, k, G = int(state.step), self.off_policy_steps, self.num_samples
        last = self.config.steps - 1
        sync_time = 0.0
        if self.sampler_version is None or self.sampler_version.version != s:  # first step; resume
            sync_time += self.push_weights(state, s, wait=True).time_s
            self.inflight.clear()
            self.engine_state = self.partial.init()  # carried groups are not checkpointed: start empty
        if self.inflight and self.inflight[0].target != s:
            self.inflight.clear()  # not this step's (cannot happen in one run; cheap to be sure)
        if not self.inflight:
            self.inflight.append(self.dispatch_partial(state, s))
        item = self.inflight.popleft()
        lag = check_lag(item, s, k)
        sample_wait, sample_time = _wait_for_rollout(item, item.rollout.rollout.tokens)
        if k and s + 1 <= last and not self.inflight:
            self.inflight.append(self.dispatch_partial(state, s + 1))

        # the hand-out into the trainer's layout, the staleness check, host rewards, the batch
        out = item.rollout
        rollout, version = self.to_trainer((out.rollout, out.version))
        payload, fill = self.to_trainer((out.payload, out.fill))
        oldest = oldest_versions_fn(G)(version, rollout.mask)
        host = sharding.to_host({"oldest": oldest, "enqueued": payload["enqueue_step"], "fill": fill})
        carried = check_partial_lag(s, host["oldest"], host["enqueued"], host["fill"], k)
        extras, logged = self.host_batch_extras(rollout, payload, G)
        batch = rollout_to_batch(rollout, payload, G, extras.pop("host_rewards", None))
        batch.update(extras)
        batch["fill"] = jnp.repeat(fill, G, axis=0)
        batch["behaviour_version"] = version
        batch.update(self.debug_switches(global_step))

        def dispatch_ahead(state):  # (5): the calls up to s + k, queued behind the update
            target = self.inflight[-1].target + 1 if self.inflight else s + 1
            while target <= min(s + k, last):
                self.inflight.append(self.dispatch_partial(state, target))
                target += 1

        state, m, more, synced, train_time = self.update_and_push(
            state, batch, s, behind_update=dispatch_ahead
        )
        truncated = item.prompts["prompt_truncated"]
        m.update(
            logged,
            **more,
            **{f"partial/{key}": v for key, v in host_metrics(out.stats).items()},
            **carried,
            prompt_truncated_frac=global_mean(np.concatenate(truncated)) if truncated else 0.0,
            **{"partial/prompt_batches": float(len(truncated))},
            **self.pipeline_metrics(synced, train_time, lag, sample_wait, sample_time, sync_time, t0),
        )
        return state, m

    def after_update(self, state):
        step, more = int(state.step), {}
        every = self.grpo.reference_reset_every
        if every and step % every == 0:
            state = reset_reference(state)
            self.reference_from = None  # π_ref is now this step's policy: checkpoints store it
        if self.retrainer is not None:
            state, more = self.retrainer.maybe_retrain(state, step)
        return state, more

    def extra_state(self):
        return self.retrainer.extra_state() if self.retrainer is not None else {}

    def close(self):
        if getattr(self, "inflight", None):
            self.inflight.clear()  # rollouts dispatched but never trained on
        self.engine_state = None
        super().close()

    def load_extra_state(self, extra):
        if self.retrainer is not None:
            self.retrainer.load_extra_state(extra)
