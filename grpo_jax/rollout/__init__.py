"""The rollout engine: continuous batching over a paged KV cache (`engine.generate`, the static sampler's
contract), the cache's pages and decode attention (`paged_cache`)."""

from grpo_jax.rollout.engine import EngineStats, generate, generate_with_stats

__all__ = ["EngineStats", "generate", "generate_with_stats"]
