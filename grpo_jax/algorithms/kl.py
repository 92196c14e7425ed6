"""Per-token estimators of KL(π_θ || π_ref) from the log-probabilities of the sampled tokens.

The tokens are sampled from the policy, so each estimator is a Monte Carlo sample of the KL whose
expectation under π_θ is (k1, k3) or approximates (k2) the true divergence. Schulman, "Approximating KL
Divergence" (http://joschu.net/blog/kl-approx.html). GRPO uses k3 (DeepSeekMath, arXiv 2402.03300 eq. 4):
unbiased, always >= 0, and low variance when the two policies are close.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

KLEstimator = Callable[[jax.Array, jax.Array], jax.Array]


def kl_k1(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    """k1 = log π_θ - log π_ref: unbiased, high variance, negative for some tokens."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    """k2 = ½ (log π_θ - log π_ref)²: biased, low variance, >= 0."""
    return 0.5 * jnp.square(logprobs - ref_logprobs)


def kl_k3(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    """k3 = π_ref/π_θ - log(π_ref/π_θ) - 1 (DeepSeekMath eq. 4): unbiased and >= 0."""
    log_ratio = ref_logprobs - logprobs
    # expm1 keeps precision when the policies agree and the two terms nearly cancel.
    return jnp.expm1(log_ratio) - log_ratio


KL_ESTIMATORS: dict[str, KLEstimator] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_divergence(name: str, logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    """Per-token KL `[N, T]` from the estimator registered as `name` in `KL_ESTIMATORS`."""
    if name not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; known: {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[name](logprobs, ref_logprobs)
