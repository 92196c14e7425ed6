"""`config.compilation_cache_dir`: scripts/train.py writes every compiled program to JAX's persistent
compilation cache there, and a second run with the same folder loads its programs instead of compiling
them (the metrics lines' `compiles` counts compilations only), with the same numbers.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache
from test_train_script import assert_ok, metric_lines, train, without_timing

from grpo_jax.training.compilation import cache_hit_count, compile_count, enable_persistent_cache

# One GRPO step and its eval: the sampler, the update and the evaluator each compile.
TINY_GRPO = ("--config.stages=grpo", "--config.grpo.steps=1", "--config.progress_bar=False")


def test_a_second_run_loads_its_programs_from_the_cache(tmp_path):
    cache = tmp_path / "xla_cache"
    runs = {}
    for name in ("first", "second"):
        workdir = tmp_path / name
        assert_ok(train(workdir, *TINY_GRPO, f"--config.compilation_cache_dir={cache}"))
        runs[name] = metric_lines(workdir)
        if name == "first":
            written = sorted(p.name for p in cache.iterdir())
            assert len(written) >= 3, written  # at least the sampler, the update and the evaluator

    compiles = {name: [x["compiles"] for x in lines if "compiles" in x] for name, lines in runs.items()}
    assert compiles["first"][-1] >= 3, compiles
    assert compiles["second"][-1] < compiles["first"][-1] / 2, compiles  # loaded, not compiled
    assert [without_timing(x) for x in runs["second"]] == [without_timing(x) for x in runs["first"]]


_CACHE_OPTIONS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


def test_compile_count_leaves_out_programs_loaded_from_the_cache(tmp_path):
    """In a process that compiled before (a notebook), enabling the cache still takes effect; a program
    compiled once and then, after jax's in-memory caches are cleared, loaded from the folder counts as one
    compilation and one cache hit."""
    saved = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
    try:
        jax.jit(lambda x: x - 1)(np.ones(3))  # something compiled before the cache is set
        enable_persistent_cache(str(tmp_path))
        program = lambda x: x * 3 + 1
        compiles, hits = compile_count(), cache_hit_count()
        jax.jit(program)(np.arange(7.0))
        assert (compile_count(), cache_hit_count()) == (compiles + 1, hits)
        assert any(tmp_path.iterdir()), "nothing written to the cache folder"
        jax.clear_caches()  # as a new process would, without starting one
        np.testing.assert_array_equal(jax.jit(program)(np.arange(7.0)), np.arange(7.0) * 3 + 1)
        assert (compile_count(), cache_hit_count()) == (compiles + 1, hits + 1)
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
