"""Stage kinds, registered by name: `sft`, `grpo`, `rm`, `rejection_sampling`, `ppo`, `dpo`.

Each is a small `Stage` subclass (see `base.py`) that builds its state, data and jitted step; the one
loop that runs them all is `grpo_jax.training.trainer.run_stage`.
"""

from grpo_jax.training.stages import (  # noqa: F401  (registers the kinds)
    grpo,
    ppo,
    preference,
    rejection_sampling,
    sft,
)
from grpo_jax.training.stages.base import (
    INIT_BASE,
    INIT_PREVIOUS,
    STAGE_KINDS,
    Stage,
    register_stage,
    stage_kind,
)

__all__ = ["INIT_BASE", "INIT_PREVIOUS", "STAGE_KINDS", "Stage", "register_stage", "stage_kind"]
