"""`python scripts/sweep.py ...`: the same command as the console entry point `grpo-sweep`.

The code is in `grpo_jax/cli/sweep.py`.
"""

from grpo_jax.cli.sweep import entry_point

if __name__ == "__main__":
    entry_point()
