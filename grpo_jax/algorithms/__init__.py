"""Pure algorithm math: advantages, policy losses, KL estimators, DPO, SFT and the PPO critic's GAE.

Every function maps arrays to arrays (no model inside), so each is unit-tested with exact numbers and
composes into the one jitted train step.
"""

from grpo_jax.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    ADVANTAGE_SCALES,
    compute_advantages,
    dr_grpo_advantages,
    group_advantages,
    grpo_advantages,
    process_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    zero_variance_groups,
)
from grpo_jax.algorithms.config import GRPOConfig, dapo_config, dr_grpo_config, gspo_config
from grpo_jax.algorithms.dpo import dpo_loss
from grpo_jax.algorithms.gae import gae_advantages, masked_whiten, ppo_token_rewards, value_loss
from grpo_jax.algorithms.grpo import LOSS_AGGREGATIONS, RATIO_LEVELS, aggregate_loss, policy_loss
from grpo_jax.algorithms.kl import KL_ESTIMATORS, kl_divergence, kl_k1, kl_k2, kl_k3
from grpo_jax.algorithms.ppo_config import PPOConfig
from grpo_jax.algorithms.sft import sft_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "ADVANTAGE_SCALES",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "RATIO_LEVELS",
    "GRPOConfig",
    "PPOConfig",
    "aggregate_loss",
    "compute_advantages",
    "dapo_config",
    "dpo_loss",
    "dr_grpo_advantages",
    "dr_grpo_config",
    "gae_advantages",
    "group_advantages",
    "grpo_advantages",
    "gspo_config",
    "kl_divergence",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "masked_whiten",
    "policy_loss",
    "ppo_token_rewards",
    "process_advantages",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "sft_loss",
    "value_loss",
    "zero_variance_groups",
]
