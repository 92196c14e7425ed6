"""grpo_jax: GRPO / DeepSeek-R1 style RL for language models in JAX."""

from setuptools import find_packages, setup

setup(
    name="grpo_jax",
    version="0.1.0",
    description="JAX-native GRPO, R1-Zero and R1 training: one XLA program per RL update.",
    packages=find_packages(include=["grpo_jax", "grpo_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "sentencepiece>=0.2",
        "ml_collections>=1.0",
        "numpy>=1.26",
        "absl-py>=2.0",
        "sympy>=1.12",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "pytest-timeout>=2.3",
            "ruff>=0.6",
            "chex>=0.1.88",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "pyarrow>=14",
        ],
        # torch==2.13.0 is the CPU build; a looser pin pulls several GB of CUDA packages.
        "hf": ["safetensors>=0.4", "tokenizers>=0.19", "transformers>=4.45", "torch==2.13.0", "peft>=0.13"],
        # Parquet task files (GSM8K, MATH, DAPO-Math-17k are published as Parquet); JSONL needs nothing.
        "parquet": ["pyarrow>=14"],
        "notebooks": ["jupyter", "nbconvert", "nbclient", "ipykernel"],
        "tpu": ["jax[tpu]"],
    },
    # The user's commands, the same code as `python scripts/NAME.py` (grpo_jax/cli/).
    entry_points={
        "console_scripts": [
            "grpo-train = grpo_jax.cli.train:entry_point",
            "grpo-sample = grpo_jax.cli.sample:entry_point",
            "grpo-evaluate = grpo_jax.cli.evaluate:entry_point",
            "grpo-convert-hf = grpo_jax.cli.convert_hf:entry_point",
            "grpo-sweep = grpo_jax.cli.sweep:entry_point",
            "grpo-aot-compile = grpo_jax.cli.aot_compile:entry_point",
            "grpo-launch-tpu-pod = grpo_jax.cli.launch_tpu_pod:entry_point",
        ]
    },
)
