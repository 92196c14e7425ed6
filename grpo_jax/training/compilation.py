"""XLA compilations: how many this process has done (the `compiles` of metrics lines, so a program that
recompiles every step shows as a growing count) and the persistent compilation cache
(`config.compilation_cache_dir`), from which a rerun, a resumed run or the next run of a sweep loads its
programs instead of compiling them again.
"""

from __future__ import annotations

import threading

import jax
from jax.experimental.compilation_cache import compilation_cache

# jax._src.dispatch's name: recorded once per program jax compiles OR loads from the persistent cache.
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# jax._src.compiler's name: recorded once per program loaded from the persistent cache.
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_counts = {"programs": 0, "cache_hits": 0, "lock": threading.Lock()}


def _on_duration_event(event: str, duration: float, **kwargs) -> None:
    if event == _BACKEND_COMPILE_EVENT:
        with _counts["lock"]:
            _counts["programs"] += 1


def _on_event(event: str, **kwargs) -> None:
    if event == _CACHE_HIT_EVENT:
        with _counts["lock"]:
            _counts["cache_hits"] += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration_event)
jax.monitoring.register_event_listener(_on_event)


def compile_count() -> int:
    """XLA compilations in this process so far (every jit program and eager op jax compiled); programs
    loaded from the persistent compilation cache were not compiled and are not counted."""
    with _counts["lock"]:
        return _counts["programs"] - _counts["cache_hits"]


def cache_hit_count() -> int:
    """Programs this process loaded from the persistent compilation cache instead of compiling them."""
    return _counts["cache_hits"]


def enable_persistent_cache(directory: str) -> None:
    """Write every compiled program to `directory` and look there before compiling ("" leaves the cache
    as it is). Any path jax's cache takes (a local folder, `gs://...`); on several processes only
    process 0 writes, so the others hit only where the folder is shared. JAX's defaults skip programs
    that compile in under a second; here every program is cached, so small CPU runs gain too.

    The cache is trusted: anyone who can write to `directory` can make this process run their code."""
    if not directory:
        return
    if jax.config.jax_compilation_cache_dir != directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        if _counts["programs"]:  # jax settled on its cache at the first compile (e.g. in a notebook)
            compilation_cache.reset_cache()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size limit
