"""Model shapes of released checkpoints, for compiling and benchmarking at real sizes without
downloading anything: `ModelConfig(**MODEL_PRESETS["qwen2.5-7b"], dtype=..., remat=...)`.
"""

# Hugging Face config.json values (Qwen/Qwen2.5-*): layers, hidden, heads, kv heads, MLP, vocabulary,
# tied embeddings. Qwen2 models have q/k/v biases; RoPE theta 1e6.
_QWEN = dict(qkv_bias=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=32768)
MODEL_PRESETS: dict[str, dict] = {
    "qwen2.5-0.5b": dict(
        _QWEN,
        num_layers=24,
        hidden_size=896,
        num_heads=14,
        num_kv_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        tie_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        _QWEN,
        num_layers=28,
        hidden_size=1536,
        num_heads=12,
        num_kv_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        tie_embeddings=True,
    ),
    "qwen2.5-3b": dict(
        _QWEN,
        num_layers=36,
        hidden_size=2048,
        num_heads=16,
        num_kv_heads=2,
        intermediate_size=11008,
        vocab_size=151936,
        tie_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        _QWEN,
        num_layers=28,
        hidden_size=3584,
        num_heads=28,
        num_kv_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
        tie_embeddings=False,
    ),
    "qwen2.5-14b": dict(
        _QWEN,
        num_layers=48,
        hidden_size=5120,
        num_heads=40,
        num_kv_heads=8,
        intermediate_size=13824,
        vocab_size=152064,
        tie_embeddings=False,
    ),
    "qwen2.5-32b": dict(
        _QWEN,
        num_layers=64,
        hidden_size=5120,
        num_heads=40,
        num_kv_heads=8,
        intermediate_size=27648,
        vocab_size=152064,
        tie_embeddings=False,
    ),
}
