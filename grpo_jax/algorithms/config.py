"""`GRPOConfig`: every switch of the GRPO family, validated once, named after the papers' symbols.

Sources: GRPO, DeepSeekMath (arXiv 2402.03300) eq. 3 and §4.1; DeepSeek-R1 (arXiv 2501.12948);
DAPO (arXiv 2503.14476); Dr. GRPO (arXiv 2503.20783); GSPO (arXiv 2507.18071).
The presets `dapo_config`, `dr_grpo_config` and `gspo_config` set each paper's recipe (docs/ALGORITHMS.md).
"""

import dataclasses
import math
import numbers
import typing
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from ml_collections.config_dict import FieldReference, placeholder

from grpo_jax.algorithms.advantages import ADVANTAGE_SCALES, ESTIMATOR_NAMES, PROCESS_ESTIMATOR
from grpo_jax.algorithms.grpo import IS_CORRECTIONS, LOSS_AGGREGATIONS, LOSS_TYPES, RATIO_LEVELS
from grpo_jax.algorithms.kl import KL_ESTIMATORS

OLD_LOGPROBS_SOURCES = ("auto", "sampler", "trainer")
WHITEN_OVER = ("sequence", "token")
# Estimators whose baseline is the group: they need at least two samples per prompt to learn anything.
_GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", PROCESS_ESTIMATOR)


class ConfigFields:
    """Dict conversions shared by the algorithm configs (`GRPOConfig`, `PPOConfig`): frozen dataclasses
    that a config file's `algo` section becomes, once, at the boundary."""

    # Keys of old config files that are no longer fields: {name: what to set instead}.
    _removed_fields: dict[str, str] = {}
    # config_fields: Optional fields whose value is None become typed placeholders instead of being left out.
    _none_as_placeholder = False

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """Build from a dict or `ml_collections.ConfigDict`, rejecting keys that are not fields.

        Typed placeholders (`ml_collections.config_dict.placeholder`) that were never set become None."""
        if hasattr(values, "to_dict"):
            values = values.to_dict()
        values = {k: v.get() if isinstance(v, FieldReference) else v for k, v in values.items()}
        removed = sorted(set(values) & set(cls._removed_fields))
        if removed:
            raise ValueError(
                "; ".join(
                    f"{cls.__name__}.{name} was removed: {cls._removed_fields[name]}" for name in removed
                )
            )
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def config_fields(cls, **overrides) -> dict[str, Any]:
        """Every field with its default (overridden by `overrides`), for a config file's `algo` section, so
        each switch can be set from the command line (`--config.grpo.algo.loss_agg=token_mean`).

        Fields whose value is None: with `_none_as_placeholder` (GRPOConfig) they become typed
        placeholders (`ml_collections.config_dict.placeholder(float)`), which the command line can set to
        a number and which `from_dict` reads back as None when unset; otherwise they are left out."""
        values = cls(**overrides).to_dict()
        if not cls._none_as_placeholder:
            return {name: value for name, value in values.items() if value is not None}
        types = {field.name: field.type for field in dataclasses.fields(cls)}
        return {
            name: placeholder(_optional_type(types[name])) if value is None else value
            for name, value in values.items()
        }


def _optional_type(annotation) -> type:
    """`float | None` -> float: the type a placeholder for an Optional field must accept."""
    options = [t for t in typing.get_args(annotation) if t is not type(None)]
    if len(options) != 1:
        raise TypeError(f"cannot make a typed placeholder for {annotation!r}")
    return options[0]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig(ConfigFields):
    """Hyperparameters of GRPO and its variants; defaults are DeepSeekMath's except G (64 there).

    Attributes:
      num_generations: G, completions sampled per prompt (the group).
      kl_coef: β, weight of the KL penalty to the reference policy (DeepSeekMath 0.04; R1 0.001).
      clip_eps_low: ε_low, the ratio is clipped below at 1 − ε_low (ε = 0.2).
      clip_eps_high: ε_high, the ratio is clipped above at 1 + ε_high (DAPO clip-higher: 0.28).
      num_iterations: μ, policy updates on each batch of rollouts (GRPO algorithm 1; 1 = on-policy).
      num_minibatches: minibatches each batch of rollouts is split into per iteration (R1: 16).
      advantage_estimator: outcome supervision, one advantage per completion: "grpo" | "dr_grpo" | "rloo"
        | "reinforce_pp" (see `ADVANTAGE_ESTIMATORS`); or "process": process supervision (DeepSeekMath
        §4.1.3), per-token advantages `Â_{i,t} = Σ_{index(j) >= t} r̃_{i,index(j)}` from group-normalised
        step rewards (`process_advantages`). "process" needs G >= 2, the batch keys `step_rewards`,
        `step_mask`, `step_end_index` (`grpo_jax.rewards.process.process_step_rewards`), and
        kl_in_reward=False; the outcome rewards are then only logged.
      advantage_scale: for "grpo": "group" (std of the group), "batch", or "none".
      advantage_eps: ε added to the std before dividing (verl 1e-6, TRL 1e-4).
      loss_agg: "seq_mean_token_mean" (GRPO) | "token_mean" (DAPO) | "seq_mean_token_sum_norm" (Dr. GRPO).
      kl_estimator: "k1" | "k2" | "k3"; DeepSeekMath eq. 4 is k3.
      kl_in_reward: fold −β·KL into the reward (PPO style) instead of adding β·KL to the loss.
      ratio_level: "token" (GRPO) or "sequence" (GSPO's length-normalised sequence ratio s_i).
      dual_clip_c: c of dual-clip PPO (arXiv 1912.09729) for negative advantages, > 1; None = off.
      entropy_coef: weight of an entropy bonus in the loss (0 = off).
      max_len_norm: the constant of Dr. GRPO's "seq_mean_token_sum_norm"; None = the generation budget.
      dynamic_sampling: DAPO dynamic sampling: groups whose rewards are all equal get weight 0.
      dynamic_sampling_refill: DAPO §3.2 with refill (`grpo_jax.training.refill`): the `grpo` stage samples
        ceil(refill_oversample × prompts_per_step) prompts per generation round and keeps sampling (at
        most refill_max_rounds extra rounds) until prompts_per_step groups with unequal rewards are in
        hand; a shortfall is filled with weight-0 groups. Filters on the outcome rewards (not "process").
      refill_oversample: prompts sampled per generation round over prompts_per_step, >= 1 (DAPO: 3).
      refill_max_rounds: the cap on extra generation rounds per step, >= 0 (verl max_num_gen_batches − 1).
      mask_truncated: DAPO §3.4 overlong filtering: completions that hit max_new_tokens without a stop
        token get sample weight 0 in the loss (separate from overlong reward shaping).
      loss_type: "grpo" (clipped surrogate, DeepSeekMath eq. 3) or "cispo" (MiniMax-M1, arXiv 2506.13585:
        sg(clip(r, 1 − ε_low, 1 + ε_high)) · Â · log π_θ per token; uses clip_eps_low/high as ε_low/ε_high).
      entropy_mask_top: q in (0, 1]: the policy-gradient term keeps only the top-q highest-entropy tokens
        of each (micro-)batch (arXiv 2506.01939, q = 0.2 there); 1.0 = off. The KL term keeps all tokens.
      is_correction: sampler/trainer mismatch correction: "none" | "token_tis" | "seq_tis" | "icepop".
        π_old = the trainer's logprobs at the rollout params (stop-gradient), π_sampler = the sampler's
        (`sampling_logprobs`, the truncated top-p/top-k distribution, else `old_logprobs`).
      is_cap: C of truncated IS: weight min(π_old/π_sampler, C) per token, or of the sequence product.
      is_mask_low, is_mask_high: IcePop bounds [α, β]: tokens whose π_old/π_sampler lies outside get weight 0.
      old_logprobs_source: where π_old comes from when `is_correction` is "none": "sampler" (the rollout's
        full-softmax logprobs), "trainer" (the trainer's forward at the rollout params, before the update,
        stop-gradient) or "auto" (the default): "trainer" when the model computes in a dtype other than
        float32, where the sampler's cached decode and the training forward round differently, else
        "sampler". With an `is_correction` it is always the trainer. Logged as `old_logprobs_from_trainer`.
      reinforce_pp_whiten: for "reinforce_pp": "sequence" (each completion counts once in the batch mean
        and std, the default) or "token" (verl's convention: whitened over tokens, so a completion weighs
        by its length).
      reference_reset_every: iterative GRPO (§4.1.4): reset π_ref to π_θ every this many steps; 0 = never
        (R1: 400).
      temperature: sampling temperature of the rollouts (R1: 1.0; 0.7 in its last stage).
    """

    num_generations: int = 8
    kl_coef: float = 0.04
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    num_iterations: int = 1
    num_minibatches: int = 1
    advantage_estimator: str = "grpo"
    advantage_scale: str = "group"
    advantage_eps: float = 1e-6
    loss_agg: str = "seq_mean_token_mean"
    kl_estimator: str = "k3"
    kl_in_reward: bool = False
    ratio_level: str = "token"
    dual_clip_c: float | None = None
    entropy_coef: float = 0.0
    max_len_norm: int | None = None
    dynamic_sampling: bool = False
    dynamic_sampling_refill: bool = False
    refill_oversample: float = 1.0
    refill_max_rounds: int = 2
    mask_truncated: bool = False
    loss_type: str = "grpo"
    entropy_mask_top: float = 1.0
    is_correction: str = "none"
    is_cap: float = 2.0
    is_mask_low: float = 0.5
    is_mask_high: float = 2.0
    old_logprobs_source: str = "auto"
    reinforce_pp_whiten: str = "sequence"
    reference_reset_every: int = 0
    temperature: float = 1.0

    _removed_fields = {
        "max_grad_norm": "gradient clipping comes from the stage's optimizer settings; set the stage "
        "field instead (e.g. --config.grpo.max_grad_norm=1.0, not --config.grpo.algo.max_grad_norm)"
    }
    _none_as_placeholder = True

    def __post_init__(self):
        _require_int(self, "num_generations", minimum=1)
        _require_float(self, "kl_coef", minimum=0.0)
        _require_float(self, "clip_eps_low", "in (0, 1)", lambda v: 0 < v < 1)
        _require_float(self, "clip_eps_high", "> 0", lambda v: v > 0)
        _require_int(self, "num_iterations", minimum=1)
        _require_int(self, "num_minibatches", minimum=1)
        _require_choice(self, "advantage_estimator", ESTIMATOR_NAMES)
        _require_choice(self, "advantage_scale", ADVANTAGE_SCALES)
        _require_float(self, "advantage_eps", minimum=0.0)
        _require_choice(self, "loss_agg", LOSS_AGGREGATIONS)
        _require_choice(self, "kl_estimator", tuple(KL_ESTIMATORS))
        _require_bool(self, "kl_in_reward")
        _require_choice(self, "ratio_level", RATIO_LEVELS)
        if self.dual_clip_c is not None:
            _require_float(self, "dual_clip_c", "> 1 or None", lambda v: v > 1)
        _require_float(self, "entropy_coef", minimum=0.0)
        if self.max_len_norm is not None:
            _require_int(self, "max_len_norm", minimum=1)
        _require_bool(self, "dynamic_sampling")
        _require_bool(self, "dynamic_sampling_refill")
        _require_float(self, "refill_oversample", minimum=1.0)
        _require_int(self, "refill_max_rounds", minimum=0)
        _require_bool(self, "mask_truncated")
        _require_choice(self, "loss_type", LOSS_TYPES)
        _require_float(self, "entropy_mask_top", "in (0, 1]", lambda v: 0 < v <= 1)
        _require_choice(self, "is_correction", IS_CORRECTIONS)
        _require_float(self, "is_cap", ">= 1", lambda v: v >= 1)
        _require_float(self, "is_mask_low", "in [0, 1]", lambda v: 0 <= v <= 1)
        _require_float(self, "is_mask_high", ">= 1", lambda v: v >= 1)
        _require_choice(self, "old_logprobs_source", OLD_LOGPROBS_SOURCES)
        _require_choice(self, "reinforce_pp_whiten", WHITEN_OVER)
        _require_int(self, "reference_reset_every", minimum=0)
        _require_float(self, "temperature", "> 0", lambda v: v > 0)
        if self.advantage_estimator in _GROUP_ESTIMATORS and self.num_generations < 2:
            _fail(
                "num_generations",
                self.num_generations,
                f">= 2 for the group baseline of advantage_estimator={self.advantage_estimator!r}",
            )
        if self.kl_in_reward and self.advantage_estimator == PROCESS_ESTIMATOR:
            _fail(
                "kl_in_reward",
                self.kl_in_reward,
                "False with advantage_estimator='process' (its advantages come from step rewards, "
                "not a sequence reward the KL could be folded into)",
            )
        if self.dynamic_sampling_refill and self.advantage_estimator == PROCESS_ESTIMATOR:
            _fail(
                "dynamic_sampling_refill",
                True,
                "False with advantage_estimator='process' (it filters groups on their outcome rewards)",
            )
        if self.loss_type == "cispo" and (self.ratio_level != "token" or self.dual_clip_c is not None):
            _fail(
                "loss_type",
                self.loss_type,
                "'grpo' with ratio_level='sequence' or dual_clip_c (CISPO clips a per-token IS weight)",
            )
        if self.reinforce_pp_whiten != "sequence" and self.advantage_estimator != "reinforce_pp":
            _fail(
                "reinforce_pp_whiten",
                self.reinforce_pp_whiten,
                "'sequence' (the default) unless advantage_estimator='reinforce_pp'",
            )
        if self.advantage_scale != "group" and self.advantage_estimator != "grpo":
            _fail(
                "advantage_scale",
                self.advantage_scale,
                f"'group' (the default) unless advantage_estimator='grpo'; "
                f"{self.advantage_estimator!r} fixes its own scaling",
            )

    @property
    def advantage_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `compute_advantages(self.advantage_estimator, rewards, G, **kwargs)`."""
        kwargs: dict[str, Any] = {"eps": self.advantage_eps}
        if self.advantage_estimator == "grpo":
            kwargs["scale"] = self.advantage_scale
        return kwargs

    def old_logprobs_from_trainer(self, compute_dtype) -> bool:
        """Whether π_old is the trainer's recomputed logprobs for a model computing in `compute_dtype`."""
        if self.is_correction != "none" or self.old_logprobs_source == "trainer":
            return True
        return self.old_logprobs_source == "auto" and jnp.dtype(compute_dtype) != jnp.float32

    @property
    def loss_kl_coef(self) -> float:
        """β as it enters the policy loss: 0 when the KL is folded into the reward instead."""
        return 0.0 if self.kl_in_reward else self.kl_coef


def _fail(name: str, value: Any, requirement: str):
    raise ValueError(f"GRPOConfig.{name} must be {requirement}, got {value!r}")


def _require_int(config: GRPOConfig, name: str, *, minimum: int):
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        _fail(name, value, f"an integer >= {minimum}")


def _require_float(
    config: GRPOConfig, name: str, requirement: str | None = None, check=None, *, minimum=None
):
    value = getattr(config, name)
    if minimum is not None:
        requirement, check = f">= {minimum}", lambda v: v >= minimum
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        _fail(name, value, f"a finite number {requirement}")
    if not check(value):
        _fail(name, value, requirement)


def _require_bool(config: GRPOConfig, name: str):
    value = getattr(config, name)
    if not isinstance(value, bool):
        _fail(name, value, "True or False")


def _require_choice(config: GRPOConfig, name: str, choices: tuple[str, ...]):
    value = getattr(config, name)
    if value not in choices:
        _fail(name, value, f"one of {choices}")


def dapo_config(**overrides) -> GRPOConfig:
    """DAPO (arXiv 2503.14476): clip-higher 0.2/0.28, token-level loss, no KL, dynamic sampling, G = 16.

    Overlong reward shaping is a reward (grpo_jax.rewards), not a loss switch.
    """
    recipe = dict(
        num_generations=16,
        clip_eps_low=0.2,
        clip_eps_high=0.28,
        kl_coef=0.0,
        loss_agg="token_mean",
        dynamic_sampling=True,
    )
    return GRPOConfig(**{**recipe, **overrides})


def dr_grpo_config(**overrides) -> GRPOConfig:
    """Dr. GRPO (arXiv 2503.20783): advantages without std, token sums / a constant, β = 0."""
    recipe = dict(advantage_estimator="dr_grpo", loss_agg="seq_mean_token_sum_norm", kl_coef=0.0)
    return GRPOConfig(**{**recipe, **overrides})


def gspo_config(**overrides) -> GRPOConfig:
    """GSPO (arXiv 2507.18071): sequence-level ratio clipped to [1 − 3e-4, 1 + 4e-4], no KL term."""
    recipe = dict(ratio_level="sequence", clip_eps_low=3e-4, clip_eps_high=4e-4, kl_coef=0.0)
    return GRPOConfig(**{**recipe, **overrides})
