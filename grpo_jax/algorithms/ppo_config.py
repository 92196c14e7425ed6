"""`PPOConfig`: the PPO-with-a-critic baseline GRPO is contrasted with, validated once, named after the
papers' symbols.

Sources: PPO (Schulman et al., arXiv 1707.06347) clipped surrogate; GAE (arXiv 1506.02438) γ, λ;
InstructGPT (arXiv 2203.02155 eq. 2) per-token reward −β·KL_t plus the outcome at the last token;
DeepSeekMath (arXiv 2402.03300) §4.1 eq. 1-2, the PPO that GRPO removes the value model from.
"""

import dataclasses
import math
import numbers

from grpo_jax.algorithms.config import ConfigFields
from grpo_jax.algorithms.kl import KL_ESTIMATORS


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig(ConfigFields):
    """Hyperparameters of PPO for language models with a learned critic V_ψ as large as the policy.

    Attributes:
      num_generations: completions sampled per prompt. PPO needs no group (1); > 1 lets it train on the
        same rollouts as GRPO.
      kl_coef: β, weight of the per-token KL penalty −β·KL_t folded into the token rewards (InstructGPT
        style; DeepSeekMath eq. 2), not into the loss.
      kl_estimator: "k1" | "k2" | "k3" estimator of KL_t between π_old (the sampler) and π_ref.
      gamma: γ, discount of GAE (1.0: an episode is one completion).
      lam: λ, GAE's bias/variance trade-off (Â_t = Σ_l (γλ)^l δ_{t+l}).
      clip_eps: ε, the ratio is clipped to [1 − ε, 1 + ε].
      value_clip_eps: ε_V of the clipped value loss (V stays within ±ε_V of V_old); None = unclipped.
      num_iterations: μ, updates of policy and critic on each batch of rollouts.
      num_minibatches: minibatches each batch of rollouts is split into per iteration.
      whiten_advantages: normalise Â to zero mean and unit variance over the batch's tokens.
      temperature: sampling temperature of the rollouts; the policy's logprobs are taken at it.
      value_learning_rate: peak learning rate of the critic's optimizer; None = the policy's.
    """

    num_generations: int = 1
    kl_coef: float = 0.04
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip_eps: float | None = 0.2
    num_iterations: int = 1
    num_minibatches: int = 1
    whiten_advantages: bool = True
    temperature: float = 1.0
    value_learning_rate: float | None = None

    def __post_init__(self):
        self._int("num_generations", minimum=1)
        self._float("kl_coef", ">= 0", lambda v: v >= 0)
        if self.kl_estimator not in KL_ESTIMATORS:
            self._fail("kl_estimator", f"one of {tuple(KL_ESTIMATORS)}")
        self._float("gamma", "in [0, 1]", lambda v: 0 <= v <= 1)
        self._float("lam", "in [0, 1]", lambda v: 0 <= v <= 1)
        self._float("clip_eps", "in (0, 1)", lambda v: 0 < v < 1)
        if self.value_clip_eps is not None:
            self._float("value_clip_eps", "> 0 or None", lambda v: v > 0)
        self._int("num_iterations", minimum=1)
        self._int("num_minibatches", minimum=1)
        if not isinstance(self.whiten_advantages, bool):
            self._fail("whiten_advantages", "True or False")
        self._float("temperature", "> 0", lambda v: v > 0)
        if self.value_learning_rate is not None:
            self._float("value_learning_rate", "> 0 or None", lambda v: v > 0)

    def _fail(self, name: str, requirement: str):
        raise ValueError(f"PPOConfig.{name} must be {requirement}, got {getattr(self, name)!r}")

    def _int(self, name: str, *, minimum: int):
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            self._fail(name, f"an integer >= {minimum}")

    def _float(self, name: str, requirement: str, check):
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            self._fail(name, f"a finite number {requirement}")
        if not check(value):
            self._fail(name, requirement)
