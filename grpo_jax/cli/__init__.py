"""The user's commands: each module is one command's code, run as `python scripts/NAME.py`, as the console
entry point `grpo-NAME` (setup.py) or as `python -m grpo_jax.cli.NAME`. Nothing in the library imports
them."""
