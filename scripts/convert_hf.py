"""`python scripts/convert_hf.py ...`: the same command as the console entry point `grpo-convert-hf`.

The code is in `grpo_jax/cli/convert_hf.py`.
"""

from grpo_jax.cli.convert_hf import entry_point

if __name__ == "__main__":
    entry_point()
