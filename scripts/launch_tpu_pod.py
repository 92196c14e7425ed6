"""`python scripts/launch_tpu_pod.py ...`: the same command as the console entry point `grpo-launch-tpu-pod`.

The code is in `grpo_jax/cli/launch_tpu_pod.py`.
"""

from grpo_jax.cli.launch_tpu_pod import entry_point

if __name__ == "__main__":
    entry_point()
