"""`python scripts/aot_compile.py ...`: the same command as the console entry point `grpo-aot-compile`.

The code is in `grpo_jax/cli/aot_compile.py`.
"""

from grpo_jax.cli.aot_compile import entry_point

if __name__ == "__main__":
    entry_point()
