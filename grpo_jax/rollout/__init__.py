"""The rollout engine: continuous batching over a paged KV cache (`engine.generate`, the static sampler's
contract), the cache's pages and decode attention (`paged_cache`), and partial rollouts (`partial`: the
engine's state carried from one training step to the next under a token budget)."""

from grpo_jax.rollout.engine import EngineStats, generate, generate_with_stats
from grpo_jax.rollout.partial import Handout, PartialRollouts

__all__ = ["EngineStats", "Handout", "PartialRollouts", "generate", "generate_with_stats"]
