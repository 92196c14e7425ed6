"""Rewards: in-graph rule rewards (run inside the jitted step), host Python rewards, a reward model.

In-graph: `make_reward_fns([(name, weight[, kwargs]), ...], TokenSpec.from_tokenizer(tok))` builds one
`fn(batch, params) -> (total [N], {name: [N]})`. Host: `HostRewardRunner({name: fn(text, example)})`
runs Python verifiers between sampler and step, in parallel, with time limits, never crashing a run.
Process supervision: `process_step_rewards(tokenizer, tokens, mask, examples, max_steps=S)` turns a step
verifier's judgements (`STEP_VERIFIERS`, e.g. `verify_arithmetic_steps`) into per-step rewards `[N, S]`.
"""

from grpo_jax.rewards.countdown import countdown_reward
from grpo_jax.rewards.host import HOST_REWARDS, HostRewardRunner, countdown_host_reward, math_accuracy_reward
from grpo_jax.rewards.math import extract_answer, is_equivalent
from grpo_jax.rewards.process import STEP_VERIFIERS, StepCheck, process_step_rewards, verify_arithmetic_steps
from grpo_jax.rewards.registry import IN_GRAPH_REWARDS, make_reward, make_reward_fns, register_reward
from grpo_jax.rewards.reward_model import (
    init_reward_head,
    init_reward_model,
    reward_model_loss,
    reward_model_scores,
)
from grpo_jax.rewards.vocabulary import TokenSpec, VocabLanguageMask, language_vocab_mask

__all__ = [
    "HOST_REWARDS",
    "IN_GRAPH_REWARDS",
    "STEP_VERIFIERS",
    "HostRewardRunner",
    "StepCheck",
    "TokenSpec",
    "VocabLanguageMask",
    "countdown_host_reward",
    "countdown_reward",
    "extract_answer",
    "init_reward_head",
    "init_reward_model",
    "is_equivalent",
    "language_vocab_mask",
    "make_reward",
    "make_reward_fns",
    "math_accuracy_reward",
    "process_step_rewards",
    "register_reward",
    "reward_model_loss",
    "reward_model_scores",
    "verify_arithmetic_steps",
]
