"""Learned reward model evaluated in-graph: a scalar head on a transformer's last real hidden state.

Params layout: `{"backbone": <grpo_jax.models params>, "head": {"kernel": [D], "bias": []}}`. Inside the
GRPO step the reward reads `params["reward_model"]` and scores prompt + completion in one forward pass.
Training uses the Bradley-Terry pairwise loss (InstructGPT, arXiv 2203.02155 eq. 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from grpo_jax.rewards.registry import register_reward


def init_reward_head(hidden_size: int, rng: jax.Array) -> dict[str, jax.Array]:
    """Scalar head: kernel ~ N(0, 1/D) so scores of unit-RMS hidden states start at O(1); bias 0."""
    kernel = jax.random.normal(rng, (hidden_size,), jnp.float32) / math.sqrt(hidden_size)
    return {"kernel": kernel, "bias": jnp.zeros((), jnp.float32)}


def init_reward_model(model_config: Any, rng: jax.Array) -> dict[str, Any]:
    """Random reward model params `{"backbone", "head"}` (use a pretrained/SFT backbone in practice)."""
    from grpo_jax.models import init_params

    backbone_rng, head_rng = jax.random.split(rng)
    return {
        "backbone": init_params(model_config, backbone_rng),
        "head": init_reward_head(model_config.hidden_size, head_rng),
    }


def last_real_positions(mask: jax.Array) -> jax.Array:
    """Index of the last position with mask=1 (0 for an all-padding row). mask [B, T] -> [B] int32"""
    positions = jnp.arange(mask.shape[-1])
    return jnp.maximum(jnp.max(jnp.where(mask > 0, positions, -1), axis=-1), 0).astype(jnp.int32)


def reward_model_scores(
    model_config: Any, params: Mapping[str, Any], tokens: jax.Array, mask: jax.Array
) -> jax.Array:
    """Scalar reward per sequence from the hidden state at its last real token.

    tokens/mask [B, T] (padding anywhere; positions come from the mask) -> float32 [B].
    """
    from grpo_jax.models import forward_hidden

    hidden = forward_hidden(model_config, params["backbone"], tokens, attention_mask=mask)  # [B, T, D]
    last = last_real_positions(mask)
    last_hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)  # [B, D]
    head = params["head"]
    return jnp.einsum("bd,d->b", last_hidden, head["kernel"].astype(jnp.float32)) + head["bias"]


def reward_model_loss(
    chosen_scores: jax.Array, rejected_scores: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Bradley-Terry loss mean(-log σ(r_chosen - r_rejected)) (InstructGPT, arXiv 2203.02155 eq. 1).

    chosen/rejected [B] -> (loss [], metrics: accuracy (share with r_c > r_r), margin, chosen, rejected).
    """
    margin = chosen_scores.astype(jnp.float32) - rejected_scores.astype(jnp.float32)
    loss = -jnp.mean(jax.nn.log_sigmoid(margin))
    metrics = {
        "rm/accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
        "rm/margin": jnp.mean(margin),
        "rm/chosen": jnp.mean(chosen_scores),
        "rm/rejected": jnp.mean(rejected_scores),
    }
    return loss, metrics


@register_reward("reward_model")
def make_reward_model(token_spec: Any, *, model_config: Any):
    """Score prompt + completion with `params["reward_model"]` ({"backbone", "head"}). [N]"""

    def reward(batch: Mapping[str, jax.Array], params: Mapping | None = None) -> jax.Array:
        if params is None or "reward_model" not in params:
            raise ValueError(
                "reward 'reward_model' needs params['reward_model'] = {'backbone': ..., 'head': ...}"
            )
        tokens = jnp.concatenate([batch["prompt_tokens"], batch["completion_tokens"]], axis=1)
        mask = jnp.concatenate([batch["prompt_mask"], batch["completion_mask"]], axis=1)
        return reward_model_scores(model_config, params["reward_model"], tokens, mask)

    return reward
