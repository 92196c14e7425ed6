"""`ppo` stages: the baseline GRPO is contrasted with (DeepSeekMath arXiv 2402.03300 §4.1, eq. 1-2):
PPO with a critic as large as the policy, token rewards −β·KL_t plus the outcome reward at the last
token, GAE(γ, λ) and a clipped value loss, in one jitted program (`grpo_jax.training.ppo_step`).
Rollouts, rewards and data are the GRPO stage's; `algo` is a `PPOConfig`, and `value_learning_rate`
(default: the policy's) drives the critic's own AdamW."""

from __future__ import annotations

from grpo_jax.algorithms.ppo_config import PPOConfig
from grpo_jax.training import setup
from grpo_jax.training.ppo_step import create_ppo_state, make_ppo_step, make_value_optimizer
from grpo_jax.training.stages.base import register_stage
from grpo_jax.training.stages.rollout import RolloutStage
from grpo_jax.training.state import learning_rate_schedule, make_optimizer


@register_stage("ppo")
class PPOStage(RolloutStage):
    trains_on_rollouts = True
    poisons_gradients = True

    @staticmethod
    def algo(stage_config):
        return PPOConfig.from_dict(setup._plain(stage_config.algo))

    def build(self, params):
        run, sc = self.run, self.config
        self.ppo = ppo = self.algo(sc)
        self.num_samples, self.temperature = ppo.num_generations, ppo.temperature
        self.build_data()
        updates = sc.steps * ppo.num_iterations * ppo.num_minibatches
        opt_config = setup.optimizer_config(sc, updates)
        optimizer = make_optimizer(opt_config)
        value_optimizer = make_value_optimizer(ppo, opt_config)
        reward_params, reward_shardings = self.reward_params()
        params, param_shardings, base = self.trainable_start(params)
        state, shardings = create_ppo_state(
            params,
            optimizer,
            value_optimizer,
            run.mesh,
            run.model_config,
            rng=self.state_rng(),
            with_reference=ppo.kl_coef > 0 and self.lora is None,  # LoRA: the reference is the base
            reference_dtype=sc.get("reference_dtype") or None,
            reward_params=reward_params,
            reward_param_shardings=reward_shardings,
            param_shardings=param_shardings,
            **base,
        )
        self.build_host_rewards()
        self.build_turns()
        self.step_fn = make_ppo_step(
            ppo,
            run.model_config,
            optimizer,
            value_optimizer,
            reward_fn=self.in_graph_rewards(),
            mesh=run.mesh,
            state_shardings=shardings,
            lr_schedule=learning_rate_schedule(opt_config),
            logprob_chunk_size=run.config.logprob_chunk_size,
        )
        return state, shardings
