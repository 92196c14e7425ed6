"""The GRPO policy loss and the variants every ablation needs, as one pure function of arrays.

DeepSeekMath (arXiv 2402.03300) eq. 3, to be maximised:
    1/G Σ_i 1/|o_i| Σ_t [ min(r_{i,t} Â_{i,t}, clip(r_{i,t}, 1-ε, 1+ε) Â_{i,t}) − β D_KL[π_θ || π_ref] ]
with r_{i,t} = π_θ(o_{i,t}) / π_old(o_{i,t}). We minimise its negative. Switches (config, not forks):
asymmetric clip-higher ε_low/ε_high (DAPO, arXiv 2503.14476 §3.1), dual clip for negative advantages
(Ye et al., arXiv 1912.09729), sequence-level ratio (GSPO, arXiv 2507.18071), entropy bonus, and the loss
aggregations of GRPO, DAPO (token level) and Dr. GRPO (constant normaliser); CISPO's clipped IS-weight
loss (MiniMax-M1, arXiv 2506.13585), the high-entropy token mask (arXiv 2506.01939), and sampler/trainer
mismatch correction (truncated IS, IcePop masking).

Shapes: N sequences (prompts × G), T completion tokens; logprobs `[N, T]` are those of the sampled tokens.
"""

import math
import numbers

import jax
import jax.numpy as jnp

from grpo_jax.algorithms.advantages import group_advantages, zero_variance_groups
from grpo_jax.algorithms.kl import kl_divergence

__all__ = [
    "IS_CORRECTIONS",
    "LOSS_AGGREGATIONS",
    "LOSS_TYPES",
    "RATIO_LEVELS",
    "aggregate_loss",
    "aggregation_normaliser",
    "importance_weights",
    "masked_quantile",
    "group_advantages",
    "policy_loss",
    "zero_variance_groups",
]

LOSS_AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
RATIO_LEVELS = ("token", "sequence")
LOSS_TYPES = ("grpo", "cispo")
IS_CORRECTIONS = ("none", "token_tis", "seq_tis", "icepop")


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, 0 where the denominator is 0 (an empty batch or sequence)."""
    return numerator / jnp.where(denominator > 0, denominator, 1.0)


def _sequence_weights(sample_weight: jax.Array | None, num_sequences: int) -> jax.Array:
    if sample_weight is None:
        return jnp.ones(num_sequences, jnp.float32)
    return jnp.asarray(sample_weight, jnp.float32)


def aggregation_normaliser(
    mask: jax.Array, loss_agg: str, sample_weight: jax.Array | None = None
) -> jax.Array:
    """The denominator `aggregate_loss` divides by: the weighted token count for "token_mean", the
    weighted count of non-empty sequences otherwise. Computed on a whole minibatch and passed to every
    micro-batch of gradient accumulation (`normaliser=`), the summed micro-batch losses and gradients
    equal the minibatch's exactly."""
    mask = jnp.asarray(mask, jnp.float32)
    sequence_weight = _sequence_weights(sample_weight, mask.shape[0])  # [N]
    if loss_agg == "token_mean":
        return jnp.sum(mask * sequence_weight[:, None])
    return jnp.sum(sequence_weight * (mask.sum(axis=1) > 0))


def aggregate_loss(
    per_token_loss: jax.Array,
    mask: jax.Array,
    loss_agg: str,
    *,
    sample_weight: jax.Array | None = None,
    max_len_norm: float | None = None,
    normaliser: jax.Array | None = None,
) -> jax.Array:
    """Reduce a per-token loss `[N, T]` to a scalar.

    loss_agg:
      "seq_mean_token_mean": mean over the tokens of each sequence, then over sequences (GRPO eq. 3).
      "token_mean": sum over every token of the batch / number of tokens (DAPO eq. 8).
      "seq_mean_token_sum_norm": per-sequence token sum / the constant `max_len_norm` (default T, the
        generation budget), then mean over sequences (Dr. GRPO, arXiv 2503.20783 §3.2).
    sample_weight `[N]` (e.g. 0 for DAPO's zero-variance groups): the sequence means are weighted by it
    and divided by the weighted count of non-empty sequences; for "token_mean" every token carries its
    sequence's weight and the sum is divided by the weighted token count. Sequences with an all-zero
    mask count for nothing, and an entirely empty batch gives loss 0, never NaN. `normaliser` replaces
    that denominator (`aggregation_normaliser` of the whole minibatch, for a micro-batch of it).
    """
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; known: {LOSS_AGGREGATIONS}")
    mask = jnp.asarray(mask, jnp.float32)
    weighted_loss = jnp.where(mask > 0, per_token_loss, 0.0) * mask  # [N, T]
    sequence_weight = _sequence_weights(sample_weight, mask.shape[0])  # [N]
    if normaliser is None:
        normaliser = aggregation_normaliser(mask, loss_agg, sample_weight)
    if loss_agg == "token_mean":
        return _safe_divide(jnp.sum(weighted_loss * sequence_weight[:, None]), normaliser)
    lengths = mask.sum(axis=1)  # [N]
    if loss_agg == "seq_mean_token_mean":
        per_sequence = _safe_divide(weighted_loss.sum(axis=1), lengths)
    else:
        constant = mask.shape[1] if max_len_norm is None else max_len_norm
        per_sequence = weighted_loss.sum(axis=1) / constant
    sequence_weight = sequence_weight * (lengths > 0)
    return _safe_divide(jnp.sum(sequence_weight * per_sequence), normaliser)


def masked_quantile(x: jax.Array, valid: jax.Array, q) -> jax.Array:
    """The q-quantile(s) of `x` over the entries where `valid`, with static shapes (a sort, jit-safe).

    Linear interpolation between order statistics, as `np.quantile(x[valid], q)`; 0 if nothing is valid.
    """
    values = jnp.sort(jnp.where(valid, x, jnp.inf).reshape(-1))  # valid entries first, ascending
    count = jnp.sum(valid)
    position = jnp.asarray(q, jnp.float32) * jnp.maximum(count - 1, 0).astype(jnp.float32)
    low = jnp.floor(position).astype(jnp.int32)
    high = jnp.minimum(low + 1, jnp.maximum(count - 1, 0))
    lo_value, hi_value = values[low], values[high]
    result = lo_value + (position - low) * jnp.where(high > low, hi_value - lo_value, 0.0)
    return jnp.where(count > 0, result, 0.0)


def importance_weights(
    old_logprobs: jax.Array,
    sampler_logprobs: jax.Array,
    mask: jax.Array,
    is_correction: str,
    *,
    is_cap: float = 2.0,
    is_mask_low: float = 0.5,
    is_mask_high: float = 2.0,
) -> jax.Array:
    """Per-token weights `[N, T]` correcting for the sampler/trainer mismatch, no gradient.

    With ρ_t = π_old(o_t) / π_sampler(o_t) (π_old: the trainer's logprobs at the rollout params;
    π_sampler: the distribution the rollout engine actually sampled from):
      "token_tis": min(ρ_t, C) (truncated IS, verl rollout correction / TRL `sampler_is`);
      "seq_tis":   min(Π_t ρ_t, C) for every token of the sequence (product taken in log space);
      "icepop":    ρ_t inside [is_mask_low, is_mask_high], 0 outside (IcePop, Ring-1T report, 2025);
      "none":      1.
    """
    if is_correction not in IS_CORRECTIONS:
        raise ValueError(f"unknown is_correction {is_correction!r}; known: {IS_CORRECTIONS}")
    valid = jnp.asarray(mask) > 0
    log_rho = jnp.where(valid, old_logprobs.astype(jnp.float32) - sampler_logprobs.astype(jnp.float32), 0.0)
    log_rho = jax.lax.stop_gradient(log_rho)
    if is_correction == "none":
        weights = jnp.ones_like(log_rho)
    elif is_correction == "token_tis":
        weights = jnp.exp(jnp.minimum(log_rho, math.log(is_cap)))
    elif is_correction == "seq_tis":
        sequence = jnp.minimum(jnp.sum(log_rho, axis=1, keepdims=True), math.log(is_cap))
        weights = jnp.broadcast_to(jnp.exp(sequence), log_rho.shape)
    else:
        rho = jnp.exp(log_rho)
        weights = jnp.where((rho >= is_mask_low) & (rho <= is_mask_high), rho, 0.0)
    return jnp.where(valid, weights, 0.0)


def _is_zero(value) -> bool:
    return isinstance(value, numbers.Number) and value == 0


def policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    ref_logprobs: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_eps_low: float,
    clip_eps_high: float,
    kl_coef: float,
    loss_agg: str,
    kl_estimator: str = "k3",
    ratio_level: str = "token",
    dual_clip_c: float | None = None,
    entropy: jax.Array | None = None,
    entropy_coef: float = 0.0,
    max_len_norm: float | None = None,
    sample_weight: jax.Array | None = None,
    loss_type: str = "grpo",
    entropy_mask_top: float = 1.0,
    sampler_logprobs: jax.Array | None = None,
    is_correction: str = "none",
    is_cap: float = 2.0,
    is_mask_low: float = 0.5,
    is_mask_high: float = 2.0,
    normaliser: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped-surrogate GRPO loss (negated DeepSeekMath eq. 3) and its metrics.

    Args:
      logprobs: `[N, T]` log π_θ of the sampled tokens (differentiated).
      old_logprobs: `[N, T]` log π_old, the sampling policy (a constant).
      ref_logprobs: `[N, T]` log π_ref, or None when `kl_coef` is the Python number 0.
      advantages: `[N]` (outcome supervision, the same for every token) or `[N, T]` (process supervision).
      mask: `[N, T]`, 1 on completion tokens; padded positions may hold any value, even -inf.
      clip_eps_low, clip_eps_high: ε_low, ε_high; the ratio is clipped to [1 − ε_low, 1 + ε_high].
      kl_coef: β, weight of the per-token KL penalty in the loss.
      loss_agg: one of `LOSS_AGGREGATIONS`, see `aggregate_loss`.
      kl_estimator: "k1" | "k2" | "k3" (DeepSeekMath eq. 4 is k3).
      ratio_level: "token" (GRPO) or "sequence" (GSPO): s_i = exp(mean_t log r_{i,t}) is clipped per
        sequence. It enters each token as GSPO-token's sg[s_i] · π_θ(o_t) / sg[π_θ(o_t)] (arXiv
        2507.18071), whose value and gradient equal GSPO's whenever advantages are per sequence.
      dual_clip_c: c > 1; for Â < 0 the surrogate is floored at c·Â, bounding the loss of very large
        ratios (Ye et al., arXiv 1912.09729). None disables it.
      entropy: `[N, T]` entropy of π_θ at each position (differentiated), needed if `entropy_coef` != 0.
      entropy_coef: weight of the entropy bonus (subtracted from the loss).
      max_len_norm: the Dr. GRPO constant for "seq_mean_token_sum_norm" (default T).
      sample_weight: `[N]` sequence weights (see `aggregate_loss`); None weighs every sequence 1.
      loss_type: "grpo" (the clipped surrogate above) or "cispo": per token sg(clip(r, 1 − ε_low,
        1 + ε_high)) · Â · log π_θ (MiniMax-M1, arXiv 2506.13585 §3.1): the clipped IS weight carries no
        gradient, so no token's gradient is dropped. Token ratios only, no dual clip.
      entropy_mask_top: q in (0, 1]: the policy-gradient term (not the KL or entropy terms) is kept only on
        tokens whose entropy is >= the (1 − q)-quantile of the counted tokens' entropies ("Beyond the
        80/20 rule", arXiv 2506.01939); the aggregation's normaliser is unchanged. Needs `entropy`.
      sampler_logprobs: `[N, T]` log π_sampler, needed when `is_correction` != "none"; `old_logprobs` is
        then the trainer's π_old at the rollout params.
      is_correction, is_cap, is_mask_low, is_mask_high: see `importance_weights`; the weight multiplies
        the policy-gradient term as a constant.
      normaliser: the aggregation's denominator for a micro-batch of a larger minibatch (see
        `aggregate_loss`); None: this batch's own. `loss` and `pg_loss` then add up over micro-batches.

    Returns:
      (loss, metrics). Metrics are scalars averaged over the tokens that count (mask × sample_weight):
      loss, pg_loss (the clipped surrogate part, aggregated like the loss), kl (mean per-token KL, 0 without a
      reference), clip_frac / clip_frac_low / clip_frac_high (share of tokens whose clip is active, i.e.
      whose gradient it zeroes: r > 1 + ε_high with Â > 0, r < 1 − ε_low with Â < 0), ratio_mean,
      ratio_min, ratio_max, plus dual_clip_frac and entropy when those are in use, entropy_threshold and
      entropy_mask_frac with the entropy mask, is_weight_mean and is_zero_frac with an IS correction.
      For "cispo" a clipped token is one whose IS weight is clipped (r > 1 + ε_high or r < 1 − ε_low),
      whatever the sign of Â.
    """
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio_level {ratio_level!r}; known: {RATIO_LEVELS}")
    if dual_clip_c is not None and not dual_clip_c > 1:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    if ref_logprobs is None and not _is_zero(kl_coef):
        raise ValueError(f"ref_logprobs is None but kl_coef={kl_coef}; pass reference logprobs or kl_coef=0")
    if entropy is None and not _is_zero(entropy_coef):
        raise ValueError(f"entropy is None but entropy_coef={entropy_coef}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; known: {LOSS_TYPES}")
    if loss_type == "cispo" and (ratio_level != "token" or dual_clip_c is not None):
        raise ValueError("loss_type='cispo' needs ratio_level='token' and dual_clip_c=None")
    if not 0 < entropy_mask_top <= 1:
        raise ValueError(f"entropy_mask_top must be in (0, 1], got {entropy_mask_top}")
    if entropy_mask_top < 1 and entropy is None:
        raise ValueError(f"entropy is None but entropy_mask_top={entropy_mask_top}")
    if is_correction != "none" and sampler_logprobs is None:
        raise ValueError(f"is_correction={is_correction!r} needs sampler_logprobs")

    mask = jnp.asarray(mask, jnp.float32)
    valid = mask > 0
    # Sanitise padding first so that -inf or NaN there can reach neither the loss nor its gradient.
    logprobs = jnp.where(valid, logprobs.astype(jnp.float32), 0.0)
    old_logprobs = jnp.where(valid, old_logprobs.astype(jnp.float32), 0.0)
    advantages = jnp.asarray(advantages, jnp.float32)
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    advantages = jnp.where(valid, jnp.broadcast_to(advantages, logprobs.shape), 0.0)

    log_ratio = logprobs - old_logprobs  # [N, T]
    if ratio_level == "sequence":
        sequence_log_ratio = _safe_divide(jnp.sum(log_ratio * mask, axis=1), mask.sum(axis=1))  # [N]
        log_ratio = jax.lax.stop_gradient(sequence_log_ratio[:, None]) + (
            logprobs - jax.lax.stop_gradient(logprobs)
        )
    ratio = jnp.exp(log_ratio)
    clipped_ratio = jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    if loss_type == "cispo":
        # MiniMax-M1 (arXiv 2506.13585) §3.1, CISPO: sg(clip(r)) · Â · log π_θ.
        surrogate = jax.lax.stop_gradient(clipped_ratio) * advantages * logprobs
    else:
        surrogate = jnp.minimum(ratio * advantages, clipped_ratio * advantages)
    if dual_clip_c is not None:
        surrogate = jnp.where(advantages < 0, jnp.maximum(surrogate, dual_clip_c * advantages), surrogate)
    token_weight = mask * _sequence_weights(sample_weight, mask.shape[0])[:, None]
    counted = token_weight > 0
    pg_weight = jnp.ones_like(surrogate)
    extra_metrics = {}
    if is_correction != "none":
        is_weight = importance_weights(
            old_logprobs,
            sampler_logprobs,
            mask,
            is_correction,
            is_cap=is_cap,
            is_mask_low=is_mask_low,
            is_mask_high=is_mask_high,
        )
        pg_weight = pg_weight * is_weight
        extra_metrics["is_weight_mean"] = is_weight
        extra_metrics["is_zero_frac"] = is_weight == 0
    if entropy_mask_top < 1:
        # arXiv 2506.01939 (80/20 rule): policy gradient only on tokens with entropy >= the (1 − q)-quantile.
        token_entropy = jax.lax.stop_gradient(entropy.astype(jnp.float32))
        threshold = masked_quantile(token_entropy, counted, 1.0 - entropy_mask_top)
        keep = token_entropy >= threshold
        pg_weight = pg_weight * keep
        extra_metrics["entropy_mask_frac"] = keep
    pg_token_loss = -pg_weight * surrogate
    per_token_loss = pg_token_loss

    if ref_logprobs is None:
        kl = jnp.zeros_like(logprobs)
    else:
        ref_logprobs = jnp.where(valid, ref_logprobs.astype(jnp.float32), 0.0)
        kl = kl_divergence(kl_estimator, logprobs, ref_logprobs)
        if not _is_zero(kl_coef):
            per_token_loss = per_token_loss + kl_coef * kl
    if entropy is not None:
        entropy = jnp.where(valid, entropy.astype(jnp.float32), 0.0)
        if not _is_zero(entropy_coef):
            per_token_loss = per_token_loss - entropy_coef * entropy

    aggregate = lambda x: aggregate_loss(
        x, mask, loss_agg, sample_weight=sample_weight, max_len_norm=max_len_norm, normaliser=normaliser
    )
    loss = aggregate(per_token_loss)

    token_mean = lambda x: _safe_divide(jnp.sum(x * token_weight), jnp.sum(token_weight))
    any_counted = jnp.any(counted)
    clipped_low = ratio < 1.0 - clip_eps_low
    clipped_high = ratio > 1.0 + clip_eps_high
    if loss_type == "grpo":  # the clip is active only where it zeroes the gradient
        clipped_low, clipped_high = clipped_low & (advantages < 0), clipped_high & (advantages > 0)
    metrics = {
        "loss": loss,
        "pg_loss": aggregate(pg_token_loss),
        "kl": token_mean(kl),
        "clip_frac": token_mean(clipped_low | clipped_high),
        "clip_frac_low": token_mean(clipped_low),
        "clip_frac_high": token_mean(clipped_high),
        "ratio_mean": token_mean(ratio),
        "ratio_min": jnp.where(any_counted, jnp.min(jnp.where(counted, ratio, jnp.inf)), 1.0),
        "ratio_max": jnp.where(any_counted, jnp.max(jnp.where(counted, ratio, -jnp.inf)), 1.0),
    }
    if dual_clip_c is not None:
        metrics["dual_clip_frac"] = token_mean((advantages < 0) & (ratio > dual_clip_c))
    if entropy is not None:
        metrics["entropy"] = token_mean(entropy)
    for name, value in extra_metrics.items():
        metrics[name] = token_mean(value)
    if entropy_mask_top < 1:
        metrics["entropy_threshold"] = threshold
    return loss, jax.lax.stop_gradient(metrics)
