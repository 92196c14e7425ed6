"""Test setup: fake 8 CPU devices before JAX starts so every test can build a real multi-axis mesh, and
compile without LLVM's optimisation passes.

The suite's models are tiny, so its time is XLA's CPU compiles, most of it in LLVM: with
`--xla_backend_optimization_level=0` the same tests take about a third less time (and CPU) and run
the same programs, only less optimised machine code. Subprocess runs inherit the flag with the rest
of XLA_FLAGS (their helpers drop only the device count). An optimisation level already in XLA_FLAGS
is kept; the device count is always 8.
"""

import os

_flags = os.environ.get("XLA_FLAGS", "").split()
if not any(flag.startswith("--xla_backend_optimization_level") for flag in _flags):
    _flags.append("--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join(_flags + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
