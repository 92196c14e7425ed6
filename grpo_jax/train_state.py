"""The train state pytree, on its own: a leaf module that checkpointing and the training code both import.

Building, sharding and updating it (optimizer, reference reset) live in `grpo_jax.training.state`.
"""

from __future__ import annotations

from typing import Any

import flax
import jax


@flax.struct.dataclass
class TrainState:
    """Everything a resume needs besides the data iterator.

    step: RL (or SFT) steps taken; params: the policy π_θ; opt_state: optax state; ref_params: the frozen
    reference π_ref (None when no KL is used); reward_params: frozen params of model-based rewards
    (e.g. {"reward_model": ...}), empty otherwise; rng: the base key (each step folds in `step`);
    aux: stage-specific state that is neither the policy nor frozen, e.g. PPO's critic
    `{"value_params", "value_opt_state"}`; empty for SFT and GRPO (so their checkpoints are unchanged).
    base: a LoRA stage's frozen base (`grpo_jax.models.lora.FrozenBase`), None otherwise. Then `params`
    holds only the trainable adapters (so the optimizer, the gradient-norm guard and checkpoints see only
    them), every forward reads `attach(base, params)`, and the reference is the base itself (`ref_params`
    None, or adapters of their own after an iterative-GRPO reset). Checkpoints never store it: it is
    rebuilt from the stage's start and checked against the fingerprint the checkpoint records.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ref_params: Any
    reward_params: Any
    rng: jax.Array
    aux: Any = flax.struct.field(default_factory=dict)
    base: Any = None
