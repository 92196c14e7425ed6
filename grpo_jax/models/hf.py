"""Hugging Face checkpoint import/export for `LlamaForCausalLM` and `Qwen2ForCausalLM`.

`load_pretrained(path)` reads `config.json` (transformers 4.x top-level `rope_theta`/`rope_scaling`,
or 5.x nested `rope_parameters`) and `*.safetensors` (one file, or sharded with
`model.safetensors.index.json`). Tensors are read one at a time through safetensors' lazy reader, stacked
per parameter on the host and placed straight into their target sharding, so at most one stacked
parameter is ever held in host memory besides the memory-mapped files.
`save_pretrained(config, params, path)` writes the same format back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from grpo_jax.inputs import DTYPES, canonical_dtype
from grpo_jax.models.config import ModelConfig
from grpo_jax.models.placement import model_param_shardings
from grpo_jax.models.transformer import Params, param_shapes

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
_INDEX_FILE = "model.safetensors.index.json"


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ----------------------------------------------------------------------------------------------


def config_from_hf(hf: dict[str, Any], *, where: str = "config.json", **overrides) -> ModelConfig:
    """Translate an HF config dict to a `ModelConfig`; unsupported features raise naming the field."""
    archs = hf.get("architectures") or []
    arch = (
        archs[0]
        if archs
        else {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(hf.get("model_type"))
    )
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{where}: unsupported architecture {arch or hf.get('model_type')!r}; "
            f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    family = SUPPORTED_ARCHITECTURES[arch]
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    ):
        if field not in hf:
            raise ValueError(f"{where}: missing field {field!r}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
    if hf.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias=true is not supported")
    if hf.get("use_sliding_window"):
        raise ValueError(f"{where}: use_sliding_window=true is not supported")
    rope_params = dict(hf.get("rope_parameters") or {})
    rope_theta = hf.get("rope_theta", rope_params.pop("rope_theta", 10000.0))
    rope_params.pop("rope_theta", None)
    scaling = hf.get("rope_scaling") or (rope_params or None)
    if scaling is not None:
        scaling = dict(scaling)
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        scaling.pop("type", None)
        if scaling.get("rope_type", "default") == "default":
            scaling = None
        elif scaling["rope_type"] not in ("llama3", "linear"):
            raise ValueError(f"{where}: rope scaling type {scaling['rope_type']!r} is not supported")
    attention_bias = bool(hf.get("attention_bias", False))
    head_dim = hf.get("head_dim")
    if head_dim == hf["hidden_size"] // hf["num_attention_heads"]:
        head_dim = None  # canonical: the default head size is left implicit
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=head_dim,
        rope_theta=float(rope_theta),
        rope_scaling=None if scaling is None else tuple(sorted(scaling.items())),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=True if family == "qwen2" else attention_bias,
        o_bias=False if family == "qwen2" else attention_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        architecture=family,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """HF config.json dict (4.x spelling: top-level rope_theta/rope_scaling, which 5.x also reads)."""
    arch = "Qwen2ForCausalLM" if config.architecture == "qwen2" else "LlamaForCausalLM"
    if config.architecture == "qwen2" and (not config.qkv_bias or config.o_bias):
        raise ValueError("a qwen2 ModelConfig must have qkv_bias=True and o_bias=False to export")
    if config.architecture == "llama" and config.qkv_bias != config.o_bias:
        raise ValueError("a llama ModelConfig exports attention_bias for q, k, v and o together")
    hf = {
        "architectures": [arch],
        "model_type": config.architecture,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.resolved_head_dim,
        "hidden_act": "silu",
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling_dict,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        "torch_dtype": config.param_dtype,
    }
    if config.architecture == "llama":
        hf["attention_bias"] = config.qkv_bias
        hf["mlp_bias"] = False
    else:
        hf["use_sliding_window"] = False
    return hf


# ----------------------------------------------------------------------------------------------
# Tensor name mapping: ours (per layer) <-> HF
# ----------------------------------------------------------------------------------------------


def _layer_mapping(config: ModelConfig) -> dict[str, tuple[str, Callable, Callable]]:
    """our layer param -> (HF name template, HF->ours transform, ours->HF transform), per layer slice."""
    D, H, K, Dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.resolved_head_dim
    t = lambda w: w.T
    m = {
        "attn_norm": ("input_layernorm.weight", lambda w: w, lambda w: w),
        "mlp_norm": ("post_attention_layernorm.weight", lambda w: w, lambda w: w),
        "q": ("self_attn.q_proj.weight", lambda w: w.T.reshape(D, H, Dh), lambda w: w.reshape(D, H * Dh).T),
        "k": ("self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, Dh), lambda w: w.reshape(D, K * Dh).T),
        "v": ("self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, Dh), lambda w: w.reshape(D, K * Dh).T),
        "o": ("self_attn.o_proj.weight", lambda w: w.T.reshape(H, Dh, D), lambda w: w.reshape(H * Dh, D).T),
        "gate": ("mlp.gate_proj.weight", t, t),
        "up": ("mlp.up_proj.weight", t, t),
        "down": ("mlp.down_proj.weight", t, t),
    }
    if config.qkv_bias:
        m["q_bias"] = ("self_attn.q_proj.bias", lambda b: b.reshape(H, Dh), lambda b: b.reshape(H * Dh))
        m["k_bias"] = ("self_attn.k_proj.bias", lambda b: b.reshape(K, Dh), lambda b: b.reshape(K * Dh))
        m["v_bias"] = ("self_attn.v_proj.bias", lambda b: b.reshape(K, Dh), lambda b: b.reshape(K * Dh))
    if config.o_bias:
        m["o_bias"] = ("self_attn.o_proj.bias", lambda b: b, lambda b: b)
    return m


class _SafetensorsReader:
    """Lazy access to tensors spread over one or more safetensors files."""

    def __init__(self, path: str):
        from safetensors import safe_open

        index_path = os.path.join(path, _INDEX_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"{path}: no *.safetensors file (and no {_INDEX_FILE})")
            weight_map = None
        self._handles = {name: safe_open(os.path.join(path, name), framework="numpy") for name in files}
        if weight_map is None:
            weight_map = {key: name for name, h in self._handles.items() for key in h.keys()}
        self.weight_map = weight_map
        self.path = path

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> np.ndarray:
        if name not in self.weight_map:
            raise KeyError(f"{self.path}: checkpoint has no tensor {name!r}")
        return self._handles[self.weight_map[name]].get_tensor(name)


def _checked(name: str, array: np.ndarray, expected: tuple[int, ...], where: str) -> np.ndarray:
    if tuple(array.shape) != tuple(expected):
        raise ValueError(
            f"{where}: tensor {name!r} has shape {tuple(array.shape)}, expected {tuple(expected)}"
        )
    return array


def load_pretrained(
    path: str,
    *,
    mesh=None,
    rules=None,
    param_dtype=None,
    dtype=None,
    **config_overrides,
) -> tuple[ModelConfig, Params]:
    """Load an HF Llama/Qwen2 directory -> (ModelConfig, params) (docs/CONTRACTS.md).

    With `mesh`, every parameter is placed directly into its sharding from the logical-axis rules.
    `param_dtype` overrides the stored weight dtype (default: config.json's `torch_dtype`), `dtype` the
    compute dtype (default: `param_dtype`); each takes a name ("bfloat16", "bf16") or a dtype
    (`jnp.bfloat16`).
    """
    if param_dtype is not None:
        param_dtype = canonical_dtype(param_dtype, "load_pretrained(param_dtype=...)")
    if dtype is not None:
        dtype = canonical_dtype(dtype, "load_pretrained(dtype=...)")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    with open(config_path) as f:
        hf = json.load(f)
    if param_dtype is None:
        stored = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        param_dtype = stored if stored in DTYPES else "float32"
    config = config_from_hf(
        hf,
        where=config_path,
        param_dtype=param_dtype,
        dtype=param_dtype if dtype is None else dtype,
        **config_overrides,
    )
    reader = _SafetensorsReader(path)
    shapes = param_shapes(config)
    target_dtype = np.dtype(config.weight_dtype)

    shardings = None if mesh is None else model_param_shardings(mesh, config, rules)

    def place(array: np.ndarray, key_path: tuple[str, ...]):
        array = np.asarray(array).astype(target_dtype)
        if shardings is None:
            return jax.device_put(array)
        sharding = shardings
        for k in key_path:
            sharding = sharding[k]
        return jax.device_put(array, sharding)

    params: dict[str, Any] = {}
    params["embed"] = place(
        _checked("model.embed_tokens.weight", reader.get("model.embed_tokens.weight"), shapes["embed"], path),
        ("embed",),
    )
    params["final_norm"] = place(
        _checked("model.norm.weight", reader.get("model.norm.weight"), shapes["final_norm"], path),
        ("final_norm",),
    )
    if not config.tie_embeddings:
        name = "lm_head.weight"
        if not reader.has(name):
            raise ValueError(f"{path}: missing tensor {name!r} (tie_word_embeddings is false)")
        params["lm_head"] = place(
            _checked(name, reader.get(name), shapes["lm_head"][::-1], path).T, ("lm_head",)
        )
    layers = {}
    for ours, (hf_name, to_ours, to_hf) in _layer_mapping(config).items():
        hf_shape = to_hf(np.empty(shapes["layers"][ours][1:], np.int8)).shape
        stacked = np.empty(shapes["layers"][ours], dtype=target_dtype)
        for i in range(config.num_layers):
            full = f"model.layers.{i}.{hf_name}"
            if not reader.has(full):
                raise ValueError(f"{path}: missing tensor {full!r}")
            stacked[i] = to_ours(_checked(full, reader.get(full), hf_shape, path))
        layers[ours] = place(stacked, ("layers", ours))
        del stacked
    params["layers"] = layers
    return config, params


def save_pretrained(
    config: ModelConfig, params: Params, path: str, *, max_shard_bytes: int = 4 << 30
) -> None:
    """Write `config.json` and safetensors (sharded with an index past `max_shard_bytes`) in HF layout."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    host = lambda x: np.asarray(jax.device_get(x))
    tensors["model.embed_tokens.weight"] = host(params["embed"])
    tensors["model.norm.weight"] = host(params["final_norm"])
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = np.ascontiguousarray(host(params["lm_head"]).T)
    for ours, (hf_name, _, to_hf) in _layer_mapping(config).items():
        stacked = host(params["layers"][ours])
        for i in range(config.num_layers):
            tensors[f"model.layers.{i}.{hf_name}"] = np.ascontiguousarray(to_hf(stacked[i]))
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if size and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
            weight_map.update({name: file for name in shard})
        total = sum(a.nbytes for a in tensors.values())
        with open(os.path.join(path, _INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(config), f, indent=2)
