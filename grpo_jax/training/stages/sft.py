"""`sft` stages: supervised fine-tuning on prompt + completion demonstrations (R1 cold start, and SFT from
the base model on the rejection-sampling set). Data: the run's task (`num_examples` of its train split),
a JSONL file of `{"prompt", "completion"}` lines, or `stage:NAME`, the set an earlier stage wrote."""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import logging

from grpo_jax import sharding
from grpo_jax.data.pipeline import make_sft_dataset, sft_length_stats
from grpo_jax.training import setup
from grpo_jax.training.sft_step import make_sft_eval, make_sft_step
from grpo_jax.training.stages.base import Stage, host_metrics, register_stage
from grpo_jax.training.state import create_train_state, learning_rate_schedule, make_optimizer

SFT_KEYS = ("tokens", "attention_mask", "loss_mask")


@register_stage("sft")
class SFTStage(Stage):
    poisons_gradients = True

    @classmethod
    def validate(cls, config, name):
        setup.check_data_spec(config, name)

    def build(self, params):
        run, sc = self.run, self.config
        examples = setup.stage_sft_examples(run, self.name)
        if sc.get("num_examples"):
            examples = examples[: sc.num_examples]
        template = run.config.template
        logging.info(
            "[%s] %s",
            self.name,
            sft_length_stats(examples, run.tokenizer, template=template, max_len=sc.max_len),
        )
        self.data_iter = iter(
            make_sft_dataset(
                examples,
                run.tokenizer,
                template=template,
                max_len=sc.max_len,
                batch_size=sc.batch_size,
                seed=run.config.seed,
                shard_index=jax.process_index(),
                shard_count=jax.process_count(),
            )
        )
        opt_config = setup.optimizer_config(sc, sc.steps)
        optimizer = make_optimizer(opt_config)
        params, param_shardings, base = self.trainable_start(params)
        state, shardings = create_train_state(
            params, optimizer, run.mesh, param_shardings, rng=self.state_rng(), with_reference=False, **base
        )
        self.step_fn = make_sft_step(
            run.model_config,
            optimizer,
            mesh=run.mesh,
            state_shardings=shardings,
            lr_schedule=learning_rate_schedule(opt_config),
            chunk_size=run.config.logprob_chunk_size,
        )
        heldout = next(
            iter(
                make_sft_dataset(
                    run.task.test,
                    run.tokenizer,
                    template=template,
                    max_len=sc.max_len,
                    batch_size=sc.batch_size,
                    seed=run.config.seed,
                    shuffle=False,
                    shard_index=jax.process_index(),
                    shard_count=jax.process_count(),
                )
            )
        )
        self.heldout = sharding.shard_batch({k: heldout[k] for k in SFT_KEYS}, run.mesh)
        self.heldout_loss = make_sft_eval(run.model_config, chunk_size=run.config.logprob_chunk_size)
        return state, shardings

    def train_step(self, state, global_step):
        t0 = time.time()
        batch = next(self.data_iter)
        device_batch = sharding.shard_batch({k: batch[k] for k in SFT_KEYS}, self.run.mesh)
        device_batch.update(self.debug_switches(global_step))
        state, step_metrics = self.step_fn(state, device_batch)
        m = host_metrics(step_metrics)
        m["step_time_s"] = time.time() - t0
        m["truncated_frac"] = float(np.mean(batch["truncated"]))
        return state, m

    def heldout_metrics(self, state):
        metrics = self.heldout_loss(self.policy_params(state), self.heldout)
        return {f"heldout/{k}": float(v) for k, v in metrics.items()}
