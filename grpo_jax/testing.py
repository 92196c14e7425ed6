"""Tiny, hermetic fixtures shared by every test: a small model config, a small tokenizer, meshes."""

from __future__ import annotations

import functools

import jax

from grpo_jax.models.config import ModelConfig
from grpo_jax.sharding import make_mesh

TINY_TEXTS = (
    "the quick brown fox jumps over the lazy dog",
    "12+34=46 carry 0 , 7*8=56",
    "<think> 3+8=11 carry 1 , 2+5+1=8 </think> <answer> 81 </answer>",
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it.",
)


def tiny_model_config(**overrides) -> ModelConfig:
    """A 2-layer GQA model (4 heads, 2 kv heads, d=32): fast to compile, exercises every code path."""
    fields = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_params(config: ModelConfig | None = None, seed: int = 0):
    from grpo_jax.models import init_params

    config = config or tiny_model_config()
    return init_params(config, jax.random.key(seed))


def mesh_2x2x2():
    """The (data=2, fsdp=2, tensor=2) mesh over the 8 fake CPU devices set up in tests/conftest.py."""
    return make_mesh((2, 2, 2))


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 96):
    """A SentencePiece tokenizer trained in-process on the arithmetic/R1 vocabulary (no file, no network)."""
    from grpo_jax.data.tasks import ArithmeticTask
    from grpo_jax.tokenizers import train_sentencepiece

    task = ArithmeticTask(seed=0)
    texts = list(TINY_TEXTS)
    for example in task.split("train", 200):
        texts.append(example["prompt"] + " " + example["completion"])
    return train_sentencepiece(texts, vocab_size=vocab_size)
