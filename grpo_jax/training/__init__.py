"""Train state, the one-program GRPO and PPO steps, SFT, reward-model and DPO steps, the training loops."""

from grpo_jax.training.grpo_step import completion_logprobs, grpo_loss, make_grpo_step, rollout_to_batch
from grpo_jax.training.ppo_step import (
    create_ppo_state,
    create_value_params,
    make_ppo_step,
    make_value_optimizer,
    token_values,
    value_shardings,
)
from grpo_jax.training.preference_steps import (
    init_rm_params_from,
    make_dpo_eval,
    make_dpo_step,
    make_rm_eval,
    make_rm_step,
    rm_param_shardings,
)
from grpo_jax.training.state import (
    OptimizerConfig,
    TrainState,
    create_train_state,
    learning_rate_schedule,
    make_optimizer,
    reset_reference,
    state_shardings,
)

__all__ = [
    "OptimizerConfig",
    "TrainState",
    "completion_logprobs",
    "create_ppo_state",
    "create_train_state",
    "create_value_params",
    "grpo_loss",
    "init_rm_params_from",
    "learning_rate_schedule",
    "make_dpo_eval",
    "make_dpo_step",
    "make_grpo_step",
    "make_optimizer",
    "make_ppo_step",
    "make_rm_eval",
    "make_rm_step",
    "make_value_optimizer",
    "reset_reference",
    "rm_param_shardings",
    "rollout_to_batch",
    "state_shardings",
    "token_values",
    "value_shardings",
]
