"""Hugging Face checkpoint import/export for `LlamaForCausalLM` and `Qwen2ForCausalLM`.

`load_pretrained(path)` reads `config.json` (transformers 4.x top-level `rope_theta`/`rope_scaling`,
or 5.x nested `rope_parameters`) and `*.safetensors` (one file, or sharded with
`model.safetensors.index.json`). Each parameter is built with `jax.make_array_from_callback` in its target
sharding: the callback reads through safetensors' lazy slices only the elements of the shard it is asked
for (per layer for the stacked layer params, transposed and reshaped from HF's [out, in] layout on the
slice) and converts only those, so a host holds its own shards of one parameter at a time, never a full
tensor of a sharded parameter (each distinct shard is read once, however many devices hold a copy).
`save_pretrained(config, params, path)` writes the same format back. A PEFT LoRA adapter directory
(`adapter_config.json` + `adapter_model.safetensors`, `grpo_jax.models.lora`) loads too, merged into the
weights it adapts: `load_pretrained(base, adapter=DIR)`, or `load_pretrained(DIR)` for the base its
`base_model_name_or_path` names.
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


# How our per-layer block sits in the HF tensor; `_read_block` reads a slice of ours from a slice of theirs.
SAME = "same"  # ours == HF
TRANSPOSED = "transposed"  # ours [a, b] = HF [b, a].T (HF stores projections as [out, in])
HEADS_IN = "heads_in"  # ours [D, N, Dh] = HF [N*Dh, D].T (q, k, v projections)
HEADS_OUT = "heads_out"  # ours [N, Dh, D] = HF [D, N*Dh].T (the output projection)
HEADS_BIAS = "heads_bias"  # ours [N, Dh] = HF [N*Dh]


def _layer_mapping(config: ModelConfig) -> dict[str, tuple[str, str, Callable]]:
    """our layer param -> (HF name template, layout of ours in HF's tensor, ours->HF transform)."""
    D, H, K, Dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.resolved_head_dim
    t = lambda w: w.T
    m = {
        "attn_norm": ("input_layernorm.weight", SAME, lambda w: w),
        "mlp_norm": ("post_attention_layernorm.weight", SAME, lambda w: w),
        "q": ("self_attn.q_proj.weight", HEADS_IN, lambda w: w.reshape(D, H * Dh).T),
        "k": ("self_attn.k_proj.weight", HEADS_IN, lambda w: w.reshape(D, K * Dh).T),
        "v": ("self_attn.v_proj.weight", HEADS_IN, lambda w: w.reshape(D, K * Dh).T),
        "o": ("self_attn.o_proj.weight", HEADS_OUT, lambda w: w.reshape(H * Dh, D).T),
        "gate": ("mlp.gate_proj.weight", TRANSPOSED, t),
        "up": ("mlp.up_proj.weight", TRANSPOSED, t),
        "down": ("mlp.down_proj.weight", TRANSPOSED, t),
    }
    if config.qkv_bias:
        m["q_bias"] = ("self_attn.q_proj.bias", HEADS_BIAS, lambda b: b.reshape(H * Dh))
        m["k_bias"] = ("self_attn.k_proj.bias", HEADS_BIAS, lambda b: b.reshape(K * Dh))
        m["v_bias"] = ("self_attn.v_proj.bias", HEADS_BIAS, lambda b: b.reshape(K * Dh))
    if config.o_bias:
        m["o_bias"] = ("self_attn.o_proj.bias", SAME, lambda b: b)
    return m


def _read_block(tensor, layout: str, index: tuple[slice, ...], head_dim: int) -> np.ndarray:
    """Block `index` (one slice per axis of ours, steps of 1) of our per-layer array, read from the HF
    tensor `tensor` (anything indexable like safetensors' lazy `get_slice`) as the one rectangle of HF
    elements it holds. A head-dim slice short of the whole head reads the whole heads (no rule shards
    `head_dim`)."""
    if layout == SAME:
        return tensor[index]
    if layout == TRANSPOSED:
        return tensor[index[1], index[0]].T
    Dh = head_dim
    heads = index[1] if layout == HEADS_IN else index[0]
    flat = slice(heads.start * Dh, heads.stop * Dh)  # HF's rows (or columns) of these heads
    n = heads.stop - heads.start
    if layout == HEADS_IN:
        block = tensor[flat, index[0]]  # [n*Dh, d]
        return block.reshape(n, Dh, block.shape[1])[:, index[2]].transpose(2, 0, 1)
    if layout == HEADS_OUT:
        block = tensor[index[2], flat]  # [d, n*Dh]
        return block.reshape(block.shape[0], n, Dh)[:, :, index[1]].transpose(1, 2, 0)
    if layout == HEADS_BIAS:
        return tensor[flat].reshape(n, Dh)[:, index[1]]
    raise ValueError(f"unknown layout {layout!r}")


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

    def slice(self, name: str):
        """safetensors' lazy view of tensor `name`: `[...]` reads only the indexed elements."""
        if name not in self.weight_map:
            raise KeyError(f"{self.path}: checkpoint has no tensor {name!r}")
        return self._handles[self.weight_map[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.slice(name).get_shape())


def _check_tensor(reader: _SafetensorsReader, name: str, expected: tuple[int, ...], why: str = "") -> None:
    """A missing tensor or one of the wrong shape raises naming it, before any parameter is built."""
    if not reader.has(name):
        raise ValueError(f"{reader.path}: missing tensor {name!r}{why}")
    shape = reader.shape(name)
    if shape != tuple(expected):
        raise ValueError(f"{reader.path}: tensor {name!r} has shape {shape}, expected {tuple(expected)}")


def _hf_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor's shape holding our per-layer array of `shape` in `layout`."""
    if layout == SAME:
        return shape
    if layout == TRANSPOSED:
        return shape[::-1]
    if layout == HEADS_IN:
        return (shape[1] * shape[2], shape[0])
    if layout == HEADS_OUT:
        return (shape[2], shape[0] * shape[1])
    return (shape[0] * shape[1],)  # HEADS_BIAS


def _load_param(
    reader: _SafetensorsReader,
    names: str | list[str],
    layout: str,
    shape: tuple[int, ...],
    sharding,
    dtype: np.dtype,
    head_dim: int,
):
    """One parameter of our `shape` from HF tensor `names` (a list: one per layer, stacked on a leading
    axis), each shard read and converted to `dtype` on its own by `jax.make_array_from_callback`.
    Without a sharding: the whole array, read the same way, on the default device (uncommitted)."""
    blocks = {}  # a shard held by several devices (a replicated axis) is read once

    def read(index) -> np.ndarray:
        index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape, strict=True))
        key = tuple((s.start, s.stop) for s in index)
        if key not in blocks:
            if isinstance(names, str):
                block = np.asarray(_read_block(reader.slice(names), layout, index, head_dim), dtype)
            else:
                layers, rest = index[0], index[1:]
                block = np.empty([s.stop - s.start for s in index], dtype)
                for j, layer in enumerate(range(layers.start, layers.stop)):
                    block[j] = _read_block(reader.slice(names[layer]), layout, rest, head_dim)
            blocks[key] = np.ascontiguousarray(block)
        return blocks[key]

    if sharding is None:
        return jax.device_put(read((slice(None),) * len(shape)))
    return jax.make_array_from_callback(shape, sharding, read)


def load_pretrained(
    path: str,
    *,
    mesh=None,
    rules=None,
    param_dtype=None,
    dtype=None,
    adapter: str | None = None,
    **config_overrides,
) -> tuple[ModelConfig, Params]:
    """Load an HF Llama/Qwen2 directory -> (ModelConfig, params) (docs/CONTRACTS.md).

    With `mesh`, every parameter is built directly in its sharding from the logical-axis rules, each
    process reading only its devices' shards (module docstring).
    `param_dtype` overrides the stored weight dtype (default: config.json's `torch_dtype`), `dtype` the
    compute dtype (default: `param_dtype`); each takes a name ("bfloat16", "bf16") or a dtype
    (`jnp.bfloat16`).
    `adapter`: a PEFT LoRA adapter directory trained on this model; its adapters are merged into the
    weights they adapt (W + (α/r)·B·A, in float32, stored in the weight dtype), so the params are plain
    ones. `path` may itself be a PEFT adapter directory: its base is then `base_model_name_or_path`.
    """
    path, adapter = _resolve_adapter(path, adapter)
    if adapter is not None:
        from grpo_jax.models import lora

        config, params = load_pretrained(
            path, mesh=mesh, rules=rules, param_dtype=param_dtype, dtype=dtype, **config_overrides
        )
        lora_config, adapters = lora.load_peft_adapter(adapter, config, mesh=mesh)
        return config, lora.Merger()(lora.FrozenBase(params, lora_config.scale), adapters)
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
    shardings = None if mesh is None else model_param_shardings(mesh, config, rules)

    # (our key path, HF name(s), layout): every tensor is checked before any parameter is built.
    plan = [(("embed",), "model.embed_tokens.weight", SAME), (("final_norm",), "model.norm.weight", SAME)]
    if not config.tie_embeddings:
        plan.append((("lm_head",), "lm_head.weight", TRANSPOSED))
    for ours, (hf_name, layout, _) in _layer_mapping(config).items():
        plan.append(
            (("layers", ours), [f"model.layers.{i}.{hf_name}" for i in range(config.num_layers)], layout)
        )
    for key_path, names, layout in plan:
        shape = shapes[key_path[0]] if len(key_path) == 1 else shapes["layers"][key_path[1]]
        per_layer = shape if isinstance(names, str) else shape[1:]
        why = " (tie_word_embeddings is false)" if key_path == ("lm_head",) else ""
        for name in [names] if isinstance(names, str) else names:
            _check_tensor(reader, name, _hf_shape(layout, per_layer), why)

    params: dict[str, Any] = {"layers": {}}
    for key_path, names, layout in plan:
        shape, sharding, target = shapes, shardings, params
        for k in key_path:
            shape = shape[k]
            sharding = None if sharding is None else sharding[k]
        for k in key_path[:-1]:
            target = target[k]
        target[key_path[-1]] = _load_param(
            reader, names, layout, shape, sharding, np.dtype(config.weight_dtype), config.resolved_head_dim
        )
    return config, params


def _resolve_adapter(path: str, adapter: str | None) -> tuple[str, str | None]:
    """(base model directory, PEFT adapter directory or None) for `load_pretrained(path, adapter=...)`:
    a `path` holding `adapter_config.json` and no `config.json` is the adapter, over the base it names."""
    is_adapter = os.path.isfile(os.path.join(path, "adapter_config.json")) and not os.path.isfile(
        os.path.join(path, "config.json")
    )
    if not is_adapter:
        return path, adapter
    if adapter is not None:
        raise ValueError(
            f"{path} is a PEFT adapter directory; pass its base model as path, not adapter={adapter!r}"
        )
    with open(os.path.join(path, "adapter_config.json")) as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base or not os.path.isdir(base):
        raise FileNotFoundError(
            f"{path}/adapter_config.json: base_model_name_or_path={base!r} is not a local model directory; "
            "load it with load_pretrained(BASE_DIR, adapter=...)"
        )
    return base, path


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
