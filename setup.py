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
        ],
        # torch==2.13.0 is the CPU build; a looser pin pulls several GB of CUDA packages.
        "hf": ["safetensors>=0.4", "tokenizers>=0.19", "transformers>=4.45", "torch==2.13.0"],
        "notebooks": ["jupyter", "nbconvert", "nbclient", "ipykernel"],
        "tpu": ["jax[tpu]"],
    },
)
