"""Critic-free advantage estimators for groups of sampled completions.

Rewards are `[N]` with `N = num_prompts * group_size`, laid out prompt-major: the G samples of prompt 0,
then the G samples of prompt 1, and so on. Group statistics reshape the global array to `[N // G, G]`
inside jit, so a group whose samples sit on different devices is normalised exactly as on one device.

Conventions shared by every estimator (docs/ALGORITHMS.md, matching verl): standard deviations are
Bessel-corrected and an epsilon (default 1e-6) is added to them; a group whose rewards are all equal gets
advantage exactly 0, and so does a one-sample group (its baseline is itself).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

ADVANTAGE_SCALES = ("group", "batch", "none")

# [N] rewards, group size -> [N] advantages.
AdvantageEstimator = Callable[..., jax.Array]


def _as_groups(rewards: jax.Array, group_size: int) -> jax.Array:
    """[N] -> [N // G, G] float32, with a clear error for a batch that is not whole groups."""
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {rewards.shape}")
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards of length {rewards.shape[0]} are not whole groups of size {group_size}")
    return rewards.reshape(-1, group_size)


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, with 0 where the denominator is 0 (there the numerator is 0 too)."""
    return numerator / jnp.where(denominator > 0, denominator, 1.0)


def _all_equal(grouped: jax.Array) -> jax.Array:
    """[M, G] -> [M, 1] bool: True where every reward of the group equals its first one, exactly."""
    return jnp.all(grouped == grouped[:, :1], axis=1, keepdims=True)


def zero_variance_groups(rewards: jax.Array, group_size: int) -> jax.Array:
    """[N] bool, True for every sample whose group's rewards are all equal.

    Such groups carry no learning signal under group-relative advantages; DAPO's dynamic sampling
    (arXiv 2503.14476 §3.2) drops them, here by giving them `sample_weight` 0 in the loss.
    """
    grouped = _as_groups(rewards, group_size)
    return jnp.repeat(_all_equal(grouped)[:, 0], group_size)


def group_advantages(
    rewards: jax.Array, group_size: int, *, scale: str = "group", eps: float = 1e-6
) -> jax.Array:
    """Group-relative advantages `[N]`: reward minus its group mean, optionally scaled.

    DeepSeekMath (arXiv 2402.03300) §4.1.2 outcome supervision: `(r_i - mean(r)) / std(r)` over the group.
    scale: "group" divides by the (Bessel) group std + eps (GRPO); "batch" divides by the std of all
    centred rewards of the batch + eps (REINFORCE++-baseline); "none" keeps the centred rewards
    (Dr. GRPO, arXiv 2503.20783).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    grouped = _as_groups(rewards, group_size)
    if group_size == 1:
        return jnp.zeros(grouped.shape[0], jnp.float32)
    centred = jnp.where(_all_equal(grouped), 0.0, grouped - grouped.mean(axis=1, keepdims=True))
    if scale == "group":
        centred = _safe_divide(centred, jnp.std(grouped, axis=1, ddof=1, keepdims=True) + eps)
    elif scale == "batch":
        centred = _safe_divide(centred, jnp.std(centred, ddof=1) + eps)
    return centred.reshape(-1)


def grpo_advantages(rewards: jax.Array, group_size: int, *, scale: str = "group", eps: float = 1e-6):
    """GRPO outcome advantages, `(r - group mean) / (group std + eps)` (arXiv 2402.03300 §4.1.2)."""
    return group_advantages(rewards, group_size, scale=scale, eps=eps)


def dr_grpo_advantages(rewards: jax.Array, group_size: int, *, eps: float = 1e-6) -> jax.Array:
    """Dr. GRPO advantages, `r - group mean` without std scaling (arXiv 2503.20783 §3.2).

    `eps` is accepted (and unused) so every registered estimator takes the same keywords.
    """
    del eps
    return group_advantages(rewards, group_size, scale="none")


def rloo_advantages(rewards: jax.Array, group_size: int, *, eps: float = 1e-6) -> jax.Array:
    """RLOO advantages, `r_i - mean_{j != i} r_j` (Ahmadian et al., arXiv 2402.14740).

    `eps` is accepted (and unused) so every registered estimator takes the same keywords.
    """
    del eps
    grouped = _as_groups(rewards, group_size)
    if group_size == 1:
        return jnp.zeros(grouped.shape[0], jnp.float32)
    leave_one_out_mean = (grouped.sum(axis=1, keepdims=True) - grouped) / (group_size - 1)
    return jnp.where(_all_equal(grouped), 0.0, grouped - leave_one_out_mean).reshape(-1)


def reinforce_pp_advantages(
    rewards: jax.Array, group_size: int, *, eps: float = 1e-6, token_counts: jax.Array | None = None
) -> jax.Array:
    """REINFORCE++ advantages, `(r - batch mean) / (batch std + eps)` (Hu, arXiv 2501.03262).

    The group structure is ignored: the baseline and the scale are global batch statistics. By default
    every completion counts once (whitening over sequences). With `token_counts` [N] (completion lengths)
    the mean and the Bessel-corrected std are taken over tokens, each completion weighing by its length,
    as verl whitens its per-token advantages (docs/ALGORITHMS.md).
    """
    flat = _as_groups(rewards, group_size).reshape(-1)
    if flat.shape[0] == 1:
        return jnp.zeros_like(flat)
    if token_counts is None:
        mean, std = flat.mean(), jnp.std(flat, ddof=1)
    else:
        weight = jnp.asarray(token_counts, jnp.float32)
        total = jnp.sum(weight)
        mean = _safe_divide(jnp.sum(weight * flat), total)
        std = jnp.sqrt(_safe_divide(jnp.sum(weight * jnp.square(flat - mean)), total - 1.0))
    centred = jnp.where(jnp.all(flat == flat[0]), 0.0, flat - mean)
    return _safe_divide(centred, std + eps)


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
}


# Process supervision takes step rewards, not one reward per sample, so it is not in the `[N] -> [N]`
# registry above; the GRPO step calls `process_advantages` for it (advantages `[N, T]`).
PROCESS_ESTIMATOR = "process"
ESTIMATOR_NAMES = (*ADVANTAGE_ESTIMATORS, PROCESS_ESTIMATOR)


def compute_advantages(name: str, rewards: jax.Array, group_size: int, **kwargs) -> jax.Array:
    """Advantages `[N]` from the estimator registered as `name` in `ADVANTAGE_ESTIMATORS`.

    kwargs: `eps` for every estimator, `scale` for "grpo" (see `GRPOConfig.advantage_kwargs`).
    """
    if name == PROCESS_ESTIMATOR:
        raise ValueError(
            "the 'process' estimator takes step rewards, not [N] rewards: call process_advantages("
            "step_rewards, step_mask, step_end_index, group_size, num_tokens)"
        )
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name](rewards, group_size, **kwargs)


def process_advantages(
    step_rewards: jax.Array,
    step_mask: jax.Array,
    step_end_index: jax.Array,
    group_size: int,
    num_tokens: int,
    *,
    eps: float = 1e-6,
) -> jax.Array:
    """Process-supervision advantages `[N, T]` (DeepSeekMath, arXiv 2402.03300 §4.1.3).

    Step rewards `[N, S]` are normalised by the mean and (Bessel) std over every valid step of the G
    completions of a group; the advantage of token t is the sum of the normalised rewards of the steps
    that end at or after t: `Â_{i,t} = Σ_{index(j) >= t} r̃_{i,index(j)}`.

    step_mask `[N, S]`: 1 for real steps. step_end_index `[N, S]` int: the completion token index where
    each step ends; indices >= num_tokens count as ending at the last token. A group with fewer than two
    valid steps, or whose step rewards are all equal, gets advantage 0.
    """
    step_rewards = jnp.asarray(step_rewards, jnp.float32)
    if step_rewards.ndim != 2:
        raise ValueError(f"step_rewards must be 2-D [N, S], got shape {step_rewards.shape}")
    num_samples, num_steps = step_rewards.shape
    if num_samples % group_size:
        raise ValueError(f"{num_samples} samples are not whole groups of size {group_size}")
    valid = jnp.asarray(step_mask) > 0
    grouped_rewards = step_rewards.reshape(-1, group_size * num_steps)  # [M, G*S]
    grouped_valid = valid.reshape(-1, group_size * num_steps)
    count = grouped_valid.sum(axis=1, keepdims=True)
    mean = _safe_divide(jnp.where(grouped_valid, grouped_rewards, 0.0).sum(axis=1, keepdims=True), count)
    squares = jnp.where(grouped_valid, (grouped_rewards - mean) ** 2, 0.0).sum(axis=1, keepdims=True)
    std = jnp.sqrt(_safe_divide(squares, count - 1.0))
    highest = jnp.where(grouped_valid, grouped_rewards, -jnp.inf).max(axis=1, keepdims=True)
    lowest = jnp.where(grouped_valid, grouped_rewards, jnp.inf).min(axis=1, keepdims=True)
    informative = (count >= 2) & (highest > lowest)
    normalised = jnp.where(informative & grouped_valid, (grouped_rewards - mean) / (std + eps), 0.0)
    normalised = normalised.reshape(num_samples, num_steps)

    end_index = jnp.clip(jnp.asarray(step_end_index, jnp.int32), 0, num_tokens - 1)
    rows = jnp.broadcast_to(jnp.arange(num_samples)[:, None], end_index.shape)
    reward_at_end = jnp.zeros((num_samples, num_tokens), jnp.float32).at[rows, end_index].add(normalised)
    # Suffix sum over tokens: token t collects every step ending at t or later.
    return jnp.flip(jnp.cumsum(jnp.flip(reward_at_end, axis=1), axis=1), axis=1)


def process_zero_variance_groups(step_rewards: jax.Array, step_mask: jax.Array, group_size: int) -> jax.Array:
    """[N] bool, True for every sample whose group carries no process signal: fewer than two valid steps
    over the group, or all valid step rewards equal. `process_advantages` gives such groups 0; dynamic
    sampling drops them, as `zero_variance_groups` does for outcome rewards."""
    step_rewards = jnp.asarray(step_rewards, jnp.float32)
    num_samples, num_steps = step_rewards.shape
    if num_samples % group_size:
        raise ValueError(f"{num_samples} samples are not whole groups of size {group_size}")
    grouped = step_rewards.reshape(-1, group_size * num_steps)
    valid = (jnp.asarray(step_mask) > 0).reshape(-1, group_size * num_steps)
    highest = jnp.where(valid, grouped, -jnp.inf).max(axis=1)
    lowest = jnp.where(valid, grouped, jnp.inf).min(axis=1)
    flat = (valid.sum(axis=1) < 2) | ~(highest > lowest)
    return jnp.repeat(flat, group_size)
