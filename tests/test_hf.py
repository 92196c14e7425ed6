"""HF checkpoints: tiny random transformers Llama/Qwen2 models load with identical logits (also on a
left-padded batch) and export back; sharded checkpoints load into their per-device shards; bad
checkpoints give clear errors.

Only the parity tests compare against transformers and need torch (the `hf` fixture skips them without
it); the rest need safetensors at most and run without torch.
"""

import collections
import json
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import models
from grpo_jax.models.transformer import param_shapes
from grpo_jax.sharding import DEFAULT_RULES
from grpo_jax.testing import mesh_2x2x2, tiny_model_config, tiny_params


@pytest.fixture(scope="module")
def hf():
    """torch and transformers (the [hf] extra; .ci/run installs it), or a skip for the tests needing them."""
    return types.SimpleNamespace(
        torch=pytest.importorskip("torch"), transformers=pytest.importorskip("transformers")
    )


@pytest.fixture(scope="module")
def safetensors():
    return pytest.importorskip("safetensors")


VARIANTS = {
    "qwen2_untied": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True)),
    "llama_gqa_untied": ("llama", dict(attention_bias=False, tie_word_embeddings=False)),
    "llama_bias_tied": ("llama", dict(attention_bias=True, tie_word_embeddings=True)),
    "llama3_rope_scaling": (
        "llama",
        dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        ),
    ),
}


def _hf_model(hf, family, extra, seed=0):
    torch, transformers = hf.torch, hf.transformers
    torch.manual_seed(seed)
    common = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=500.0,
    )
    common.update(extra)
    if family == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # random, non-trivial biases and norms so every tensor matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.float().eval()


def _hf_logits(hf, model, tokens, mask, position_ids=None):
    torch = hf.torch
    kwargs = {} if position_ids is None else {"position_ids": torch.tensor(position_ids)}
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), **kwargs)
    return out.logits.numpy()


TOKENS = np.array([[5, 17, 33, 2, 90, 11, 7, 60, 3, 44, 21, 8], [9, 1, 4, 77, 23, 5, 6, 18, 40, 33, 2, 13]])
MASK = np.ones_like(TOKENS)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_import_and_export_parity(variant, tmp_path, hf):
    family, extra = VARIANTS[variant]
    hf_model = _hf_model(hf, family, extra)
    src = tmp_path / "hf"
    hf_model.save_pretrained(src, safe_serialization=True)
    expected = _hf_logits(hf, hf_model, TOKENS, MASK)

    config, params = models.load_pretrained(str(src))
    assert config.architecture == family
    assert config.tie_embeddings == extra.get("tie_word_embeddings", False)
    got = np.asarray(models.forward(config, params, jnp.asarray(TOKENS)))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)

    out = tmp_path / "export"
    models.save_pretrained(config, params, str(out))
    cls = hf.transformers.Qwen2ForCausalLM if family == "qwen2" else hf.transformers.LlamaForCausalLM
    reloaded = cls.from_pretrained(out).float().eval()
    np.testing.assert_allclose(_hf_logits(hf, reloaded, TOKENS, MASK), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["qwen2_untied", "llama3_rope_scaling"])
def test_hf_parity_on_a_left_padded_batch(variant, tmp_path, hf):
    family, extra = VARIANTS[variant]
    hf_model = _hf_model(hf, family, extra)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    config, params = models.load_pretrained(str(tmp_path))

    pads = [5, 2]  # row 0: 5 pad tokens then 7 real ones; row 1: 2 then 10
    mask = (np.arange(TOKENS.shape[1])[None, :] >= np.asarray(pads)[:, None]).astype(np.int64)
    tokens = np.where(mask > 0, TOKENS, 0)
    # HF needs position ids for left padding (its generate() derives them from the mask the same way);
    # ours come from the mask by contract.
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    expected = _hf_logits(hf, hf_model, tokens, mask, positions)
    got = np.asarray(models.forward(config, params, jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    real = mask > 0
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=1e-4)
    # The reference itself is right: each row's real tokens give HF's logits of that row alone, unpadded.
    for row, pad in enumerate(pads):
        alone = TOKENS[row : row + 1, pad:]
        np.testing.assert_allclose(
            expected[row, pad:], _hf_logits(hf, hf_model, alone, np.ones_like(alone))[0], atol=1e-4, rtol=1e-4
        )


def test_sharded_checkpoint_with_index_loads_onto_mesh(tmp_path, safetensors):
    config = tiny_model_config(architecture="qwen2", qkv_bias=True)
    params = tiny_params(config)
    models.save_pretrained(config, params, str(tmp_path), max_shard_bytes=20_000)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    mesh = mesh_2x2x2()
    loaded_config, loaded = models.load_pretrained(str(tmp_path), mesh=mesh)
    assert loaded_config == config

    # Every parameter is placed in its sharding from the rules: per-device shards of the planned shape,
    # each holding its own slice of the checkpoint's values.
    def check(path, x, expected, original):
        where = jax.tree_util.keystr(path)
        assert x.sharding.is_equivalent_to(expected, x.ndim), where
        assert x.addressable_shards[0].data.shape == expected.shard_shape(x.shape), where
        for shard in x.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(original)[shard.index], where)

    jax.tree_util.tree_map_with_path(check, loaded, models.model_param_shardings(mesh, config), params)
    # ... and those shapes really split the arrays over the 2x2x2 mesh (a replicated array would have
    # the global shape): q [L, D, H, Dh] over fsdp and tensor, gate [L, D, F] too, embed [V, D] as well.
    shard_shapes = {k: v.addressable_shards[0].data.shape for k, v in loaded["layers"].items()}
    assert loaded["layers"]["q"].shape == (2, 32, 4, 8) and shard_shapes["q"] == (2, 16, 2, 8)
    assert loaded["layers"]["gate"].shape == (2, 32, 64) and shard_shapes["gate"] == (2, 16, 32)
    assert loaded["embed"].shape == (128, 32) and loaded["embed"].addressable_shards[0].data.shape == (64, 16)


# Shard-by-shard loading. GQA with 6 heads and 3 kv heads: on tensor=2 the heads split, the kv heads do not
# (replicated over tensor); vocab 96 and d=48 split too. "split_more" also splits the stacked layers over
# data and, where the kv heads cannot take tensor, the head dim within each head.
SHARDED_MODEL = dict(
    vocab_size=96,
    hidden_size=48,
    num_attention_heads=6,
    num_key_value_heads=3,
    head_dim=8,
    intermediate_size=64,
)
SPLIT_MORE = tuple(dict(DEFAULT_RULES, layers="data", head_dim="tensor").items())


@pytest.mark.parametrize(
    "family, extra, rules, param_dtype",
    [
        ("qwen2", dict(tie_word_embeddings=False), None, "float32"),  # q/k/v biases, an lm_head
        ("qwen2", dict(tie_word_embeddings=False), SPLIT_MORE, "bfloat16"),  # converted slice by slice
        ("llama", dict(attention_bias=True, tie_word_embeddings=True), SPLIT_MORE, "float32"),  # o bias
    ],
    ids=["qwen2", "qwen2_split_more_bf16", "llama_bias_split_more"],
)
def test_loading_onto_a_mesh_gives_the_whole_tensor_loads_values(
    tmp_path, hf, family, extra, rules, param_dtype
):
    """Every param built shard by shard on a (2, 2, 2) mesh equals the one read whole (no mesh), in its
    planned sharding, also converted to bf16 slice by slice."""
    hf_model = _hf_model(hf, family, dict(SHARDED_MODEL, **extra))
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    mesh = mesh_2x2x2()
    config, whole = models.load_pretrained(str(tmp_path), param_dtype=param_dtype)
    _, sharded = models.load_pretrained(str(tmp_path), mesh=mesh, rules=rules, param_dtype=param_dtype)
    shardings = models.model_param_shardings(mesh, config, rules)
    assert jax.tree_util.tree_structure(sharded) == jax.tree_util.tree_structure(whole)

    def check(path, got, want, sharding):
        where = jax.tree_util.keystr(path)
        assert got.dtype == want.dtype == jnp.dtype(param_dtype), where
        assert got.sharding.is_equivalent_to(sharding, got.ndim), where
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), where)

    jax.tree_util.tree_map_with_path(check, sharded, whole, shardings)
    specs = {k: v.sharding.spec for k, v in sharded["layers"].items()}
    assert "tensor" in specs["q"] and "tensor" not in specs["k"][:3]  # heads split, kv heads not
    if rules is SPLIT_MORE:
        assert specs["q"][0] == "data" and specs["k"][3] == "tensor"  # layers, and within kv heads
    logits = models.forward(config, sharded, jnp.asarray(TOKENS))
    want = _hf_logits(hf, hf_model, TOKENS, MASK)
    tolerance = 1e-4 if param_dtype == "float32" else 0.15
    np.testing.assert_allclose(np.asarray(logits), want, atol=tolerance, rtol=tolerance)


def test_a_sharded_param_is_read_one_shard_at_a_time(tmp_path, hf, monkeypatch):
    """Counting the elements of every read from the safetensors files: a param split over the mesh
    reads, per HF tensor, each distinct shard once and only that shard's elements (never the whole
    tensor); a replicated param reads the whole tensor once, not once per device."""
    from grpo_jax.models import hf as hf_io

    hf_model = _hf_model(hf, "qwen2", dict(SHARDED_MODEL, tie_word_embeddings=False))
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    reads = collections.defaultdict(list)  # HF tensor name -> elements of each read, in order
    open_slice = hf_io._SafetensorsReader.slice

    class CountingSlice:
        def __init__(self, name, lazy):
            self.name, self.lazy = name, lazy

        def __getitem__(self, index):
            block = self.lazy[index]
            reads[self.name].append(block.size)
            return block

        def get_shape(self):
            return self.lazy.get_shape()

    monkeypatch.setattr(
        hf_io._SafetensorsReader, "slice", lambda self, name: CountingSlice(name, open_slice(self, name))
    )
    mesh = mesh_2x2x2()
    config, _ = models.load_pretrained(str(tmp_path), mesh=mesh)
    shardings = models.model_param_shardings(mesh, config)
    shapes = param_shapes(config)

    def distinct_shards(sharding, shape):
        indices = sharding.devices_indices_map(shape).values()
        return {tuple(s.indices(n) for s, n in zip(i, shape)) for i in indices}

    expected = {}  # HF name -> elements of each read
    top = {
        "embed": "model.embed_tokens.weight",
        "final_norm": "model.norm.weight",
        "lm_head": "lm_head.weight",
    }
    for ours, name in top.items():
        shape, sharding = shapes[ours], shardings[ours]
        expected[name] = [math.prod(sharding.shard_shape(shape))] * len(distinct_shards(sharding, shape))
    for ours, (hf_name, _, _) in hf_io._layer_mapping(config).items():
        shape, sharding = shapes["layers"][ours], shardings["layers"][ours]
        per_layer = math.prod(sharding.shard_shape(shape)[1:])
        for layer in range(config.num_layers):
            expected[f"model.layers.{layer}.{hf_name}"] = [per_layer] * len(distinct_shards(sharding, shape))
    assert dict(reads) == expected

    split = [name for name, sizes in expected.items() if len(sizes) > 1]
    assert len(split) >= 10, split  # embed, lm_head, q, o, gate, up, down, q_bias (per layer) ...
    for name in split:
        full = math.prod(hf_io._SafetensorsReader(str(tmp_path)).shape(name))
        assert max(reads[name]) < full and sum(reads[name]) == full, name  # each element read once


def test_bad_checkpoints_give_clear_errors(tmp_path, safetensors):
    config = tiny_model_config()
    models.save_pretrained(config, tiny_params(config), str(tmp_path))
    with open(tmp_path / "config.json") as f:
        hf = json.load(f)

    hf_bad = dict(hf, architectures=["MistralForCausalLM"], model_type="mistral")
    with open(tmp_path / "config.json", "w") as f:
        json.dump(hf_bad, f)
    with pytest.raises(ValueError, match="unsupported architecture 'MistralForCausalLM'"):
        models.load_pretrained(str(tmp_path))

    with open(tmp_path / "config.json", "w") as f:
        json.dump(dict(hf, intermediate_size=80), f)
    with pytest.raises(
        ValueError, match=r"model.layers.0.mlp.gate_proj.weight' has shape \(64, 32\), expected"
    ):
        models.load_pretrained(str(tmp_path))

    with open(tmp_path / "config.json", "w") as f:
        json.dump(dict(hf, num_hidden_layers=3), f)
    with pytest.raises(ValueError, match="missing tensor 'model.layers.2.input_layernorm.weight'"):
        models.load_pretrained(str(tmp_path))

    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load_pretrained(str(tmp_path / "nowhere"))


def test_config_reads_both_rope_spellings():
    from grpo_jax.models.hf import config_from_hf

    base = dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    v4 = config_from_hf(dict(base, rope_theta=5e5, rope_scaling=scaling))
    v5 = config_from_hf(dict(base, rope_parameters=dict(scaling, rope_theta=5e5)))
    assert v4 == v5
    assert v4.rope_theta == 5e5 and v4.rope_scaling_dict["factor"] == 8.0
