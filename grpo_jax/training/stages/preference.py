"""Stages trained on preference pairs: `rm` (a reward model, Bradley–Terry, InstructGPT arXiv 2203.02155
eq. 1) and `dpo` (Direct Preference Optimization, arXiv 2305.18290 eq. 7).

Pairs (`config.<stage>.data`): "" builds offline synthetic pairs from the run's task demonstrations
(`grpo_jax.data.preferences.synthetic_preference_pairs`: a correct, well-formed completion preferred over
a wrong or malformed one); "stage:NAME" reads the `pairs.jsonl` an earlier `rejection_sampling` stage
wrote (kept vs dropped samples); any other value is a JSONL file of {"prompt", "chosen", "rejected"}.
Held-out pairs are always built from the task's test split, so no held-out prompt is trained on.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import logging

from grpo_jax import models, sharding
from grpo_jax.data.preferences import (
    load_preference_jsonl,
    make_preference_dataset,
    preference_length_stats,
    synthetic_preference_pairs,
)
from grpo_jax.models.lora import attach_backbone
from grpo_jax.rewards.reward_model import init_reward_head
from grpo_jax.training import setup
from grpo_jax.training.preference_steps import (
    init_rm_params_from,
    make_dpo_eval,
    make_dpo_step,
    make_rm_eval,
    make_rm_step,
    rm_param_shardings,
)
from grpo_jax.training.stages.base import Stage, host_metrics, register_stage
from grpo_jax.training.state import (
    create_train_state,
    learning_rate_schedule,
    make_optimizer,
    reference_params,
)

PAIR_KEYS = tuple(
    f"{side}_{part}" for side in ("chosen", "rejected") for part in ("tokens", "attention_mask", "loss_mask")
)


class PreferenceStage(Stage):
    """Pair data, held-out pairs and the step loop shared by `rm` and `dpo`."""

    poisons_gradients = True

    @classmethod
    def validate(cls, config, name):
        setup.check_data_spec(config, name)
        setup.check_reference_dtype(config, name)

    def pairs(self) -> list[dict]:
        run, sc = self.run, self.config
        path = setup.stage_data_file(run, self.name, "pairs.jsonl")
        if path is not None:
            pairs = load_preference_jsonl(path)
        else:
            pairs = synthetic_preference_pairs(run.task.train, seed=run.config.seed)
        if sc.get("num_examples"):
            pairs = pairs[: sc.num_examples]
        if not pairs:
            raise ValueError(f"stage {self.name!r}: no preference pairs (data={sc.get('data', '')!r})")
        return pairs

    def build_data(self):
        run, sc = self.run, self.config
        pairs = self.pairs()
        template = run.config.template
        logging.info(
            "[%s] %s",
            self.name,
            preference_length_stats(pairs, run.tokenizer, template=template, max_len=sc.max_len),
        )
        self.data_iter = iter(
            make_preference_dataset(
                pairs,
                run.tokenizer,
                template=template,
                max_len=sc.max_len,
                batch_size=sc.batch_size,
                seed=run.config.seed + self.index,
                shard_index=jax.process_index(),
                shard_count=jax.process_count(),
            )
        )
        heldout_pairs = synthetic_preference_pairs(run.task.test, seed=run.config.seed + 1)
        size = min(len(heldout_pairs), sc.get("heldout_pairs", 64))
        size -= size % (run.mesh.shape["data"] * run.mesh.shape["fsdp"])
        heldout = next(
            iter(
                make_preference_dataset(
                    heldout_pairs[:size],
                    run.tokenizer,
                    template=template,
                    max_len=sc.max_len,
                    batch_size=size,
                    seed=0,
                    shuffle=False,
                    shard_index=jax.process_index(),
                    shard_count=jax.process_count(),
                )
            )
        )
        self.heldout = sharding.shard_batch({k: heldout[k] for k in PAIR_KEYS}, run.mesh)

    def optimizer(self):
        opt_config = setup.optimizer_config(self.config, self.config.steps)
        return opt_config, make_optimizer(opt_config)

    def train_step(self, state, global_step):
        t0 = time.time()
        batch = next(self.data_iter)
        device_batch = sharding.shard_batch({k: batch[k] for k in PAIR_KEYS}, self.run.mesh)
        device_batch.update(self.debug_switches(global_step))
        state, step_metrics = self.step_fn(state, device_batch)
        m = host_metrics(step_metrics)
        m["truncated_frac"] = float(np.mean(batch["truncated"]))
        m["step_time_s"] = time.time() - t0
        return state, m


@register_stage("rm")
class RewardModelStage(PreferenceStage):
    """A reward model (the policy's transformer with a scalar head) initialised from `init_from`'s
    params; its result goes into later GRPO stages' `TrainState.reward_params` (`reward_model_from`)."""

    produces_policy = False
    attach_fn = staticmethod(attach_backbone)  # LoRA: the adapters are the backbone's; the head is trained

    def build(self, params):
        run = self.run
        self.build_data()
        opt_config, optimizer = self.optimizer()
        head_rng = jax.random.key(run.config.seed + 3)
        base = {}
        if self.lora is None:
            shardings = rm_param_shardings(run.mesh, run.model_config)
            rm_params = init_rm_params_from(params, run.model_config, head_rng)
        else:
            adapters, adapter_shardings, base = self.trainable_start(params)
            replicated = sharding.replicated(run.mesh)
            shardings = {"backbone": adapter_shardings, "head": {"kernel": replicated, "bias": replicated}}
            rm_params = {
                "backbone": adapters,
                "head": init_reward_head(run.model_config.hidden_size, head_rng),
            }
        state, state_shardings = create_train_state(
            rm_params, optimizer, run.mesh, shardings, rng=self.state_rng(), with_reference=False, **base
        )
        self.step_fn = make_rm_step(
            run.model_config,
            optimizer,
            mesh=run.mesh,
            state_shardings=state_shardings,
            lr_schedule=learning_rate_schedule(opt_config),
        )
        self.evaluate = make_rm_eval(run.model_config)
        return state, state_shardings

    def result_template(self):
        run = self.run
        shapes = jax.eval_shape(
            lambda: init_rm_params_from(
                models.init_params(run.model_config, jax.random.key(0)), run.model_config, jax.random.key(0)
            )
        )
        return shapes, rm_param_shardings(run.mesh, run.model_config)

    def heldout_metrics(self, state):
        metrics = self.evaluate(self.policy_params(state), self.heldout)
        return {f"heldout/{k}": float(v) for k, v in metrics.items()}

    def policy_params(self, state):
        return attach_backbone(state.base, state.params)

    def progress(self, metrics):
        return {"loss": metrics["loss"], "pair_acc": metrics["rm/accuracy"]}

    def finish(self, state):
        heldout = self.heldout_metrics(state)
        return {
            "heldout_pair_accuracy": heldout["heldout/rm/accuracy"],
            "heldout_loss": heldout["heldout/loss"],
        }


@register_stage("dpo")
class DPOStage(PreferenceStage):
    """DPO of the policy against a frozen reference (a copy of its starting params), β = `beta`."""

    def build(self, params):
        run, sc = self.run, self.config
        self.build_data()
        opt_config, optimizer = self.optimizer()
        params, param_shardings, base = self.trainable_start(params)
        state, state_shardings = create_train_state(
            params,
            optimizer,
            run.mesh,
            param_shardings,
            rng=self.state_rng(),
            with_reference=self.lora is None,  # LoRA: the reference is the base
            reference_dtype=sc.get("reference_dtype") or None,
            **base,
        )
        chunk = run.config.logprob_chunk_size
        self.step_fn = make_dpo_step(
            run.model_config,
            optimizer,
            beta=sc.beta,
            label_smoothing=sc.get("label_smoothing", 0.0),
            mesh=run.mesh,
            state_shardings=state_shardings,
            lr_schedule=learning_rate_schedule(opt_config),
            chunk_size=chunk,
        )
        self.evaluate = make_dpo_eval(
            run.model_config, beta=sc.beta, label_smoothing=sc.get("label_smoothing", 0.0), chunk_size=chunk
        )
        return state, state_shardings

    def heldout_metrics(self, state):
        metrics = self.evaluate(self.policy_params(state), reference_params(state), self.heldout)
        return {f"heldout/{k}": float(v) for k, v in metrics.items()}

    def progress(self, metrics):
        return {"loss": metrics["loss"], "pair_acc": metrics["dpo/reward_accuracy"]}
