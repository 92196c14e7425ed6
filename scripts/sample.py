"""`python scripts/sample.py ...`: the same command as the console entry point `grpo-sample`.

The code is in `grpo_jax/cli/sample.py`.
"""

from grpo_jax.cli.sample import entry_point

if __name__ == "__main__":
    entry_point()
