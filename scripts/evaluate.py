"""`python scripts/evaluate.py ...`: the same command as the console entry point `grpo-evaluate`.

The code is in `grpo_jax/cli/evaluate.py`.
"""

from grpo_jax.cli.evaluate import entry_point

if __name__ == "__main__":
    entry_point()
