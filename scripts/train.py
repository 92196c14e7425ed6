"""`python scripts/train.py ...`: the same command as the console entry point `grpo-train`.

The code is in `grpo_jax/cli/train.py`.
"""

from grpo_jax.cli.train import entry_point

if __name__ == "__main__":
    entry_point()
