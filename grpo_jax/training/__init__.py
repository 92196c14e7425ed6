"""Train state, the one-program GRPO and PPO steps, SFT step and the training loops."""

from grpo_jax.training.grpo_step import completion_logprobs, grpo_loss, make_grpo_step, rollout_to_batch
from grpo_jax.training.ppo_step import (
    create_ppo_state,
    create_value_params,
    make_ppo_step,
    make_value_optimizer,
    token_values,
    value_shardings,
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
    "learning_rate_schedule",
    "make_grpo_step",
    "make_optimizer",
    "make_ppo_step",
    "make_value_optimizer",
    "reset_reference",
    "rollout_to_batch",
    "state_shardings",
    "token_values",
    "value_shardings",
]
