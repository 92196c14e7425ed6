"""Train state, the one-program GRPO step, SFT step and the training loops."""

from grpo_jax.training.grpo_step import completion_logprobs, grpo_loss, make_grpo_step, rollout_to_batch
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
    "create_train_state",
    "grpo_loss",
    "learning_rate_schedule",
    "make_grpo_step",
    "make_optimizer",
    "reset_reference",
    "rollout_to_batch",
    "state_shardings",
]
