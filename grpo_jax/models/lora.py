"""LoRA adapters for the decoder's projections: W' = W + (α/r)·B·A (Hu et al., arXiv 2106.09685).

An adapter pair per targeted projection (`TARGETS`: q, k, v, o, gate, up, down), stacked on the leading
`layers` axis like the weights they adapt, in a params-shaped tree:

    {"layers": {"lora": {"q": {"a": [L, D, r], "b": [L, r, H, Dh]}, "o": {"a": [L, H, Dh, r], "b": [L, r, D]},
                         "down": {"a": [L, F, r], "b": [L, r, D]}, ...}}}

A has the weight's input axes then the rank, B the rank then the output axes, so `x·A·B` has the
projection's shape; their logical axes are the weight's input (A) and output (B) axes with the rank
replicated ("lora_rank"), so they shard like the rest of the model. A starts Kaiming-uniform (PEFT's
default: U(−1/√fan_in, 1/√fan_in)) and B at zero, so a fresh adapter leaves the model exactly as it was.

The frozen base travels as a `FrozenBase` (its params and the scale α/r). `attach(base, adapters)` is
the one place that turns the pair into the params every model function takes: the base's tree with the
adapters under `layers/lora` and B already multiplied by α/r; the layer then adds `x·A·(αB/r)` to each
targeted projection (`transformer._project`), so no merged copy of a weight is ever made in training and
the autodiff of the adapters is that of W + (α/r)·B·A. `merge` makes the merged weights instead (for a
sampler that decodes many tokens, and for the stage result every reader loads). The PEFT adapter format
(`adapter_config.json` + `adapter_model.safetensors`, the layout `peft` loads onto the Hugging Face model)
is written and read by `save_peft_adapter` and `load_peft_adapter`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.inputs import canonical_dtype
from grpo_jax.models.config import ModelConfig
from grpo_jax.models.transformer import logical_axes, param_shapes
from grpo_jax.sharding import param_shardings, resolve_strict

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
SAMPLER_WEIGHTS = ("merged", "adapters")
LORA_KEY = "lora"  # where the adapters sit in a layer's params
RANK_AXIS = "lora_rank"
# How many leading (after `layers`) dims of each targeted weight are its input: o is [H, Dh, D].
_INPUT_DIMS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}
# The Hugging Face module each target adapts (the PEFT `target_modules` names).
HF_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
ADAPTER_INFO_FILE = "grpo_jax_adapter.json"  # beside them: what PEFT has no field for


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """`config.lora`: one adapter setting for every stage whose section says `lora=True`.

    rank: r; alpha: α (the update is scaled by α/r: with α fixed, the best learning rate moves little
    with the rank); targets: which projections get adapters; base_dtype: the frozen base's storage dtype
    ("" = the params' own, "bfloat16" halves it; its forward computes in the model's compute dtype
    either way); sampler_weights: what the sampler decodes with, "merged" (W + (α/r)·B·A made once per
    rollout, in the compute dtype: a second copy of the targeted weights while sampling, the plain
    decode after) or "adapters" (the base plus x·A·B at every token: no copy).
    """

    rank: int = 8
    alpha: float = 32.0
    targets: tuple[str, ...] = TARGETS
    base_dtype: str = ""
    sampler_weights: str = "merged"

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"config.lora.rank must be a positive int, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"config.lora.alpha must be > 0, got {self.alpha!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        unknown = [t for t in targets if t not in TARGETS]
        if unknown or not targets or len(set(targets)) != len(targets):
            raise ValueError(
                f"config.lora.targets must be distinct names among {TARGETS}, got {tuple(self.targets)!r}"
            )
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))
        object.__setattr__(self, "alpha", float(self.alpha))
        if self.base_dtype:
            object.__setattr__(self, "base_dtype", canonical_dtype(self.base_dtype, "config.lora.base_dtype"))
        if self.sampler_weights not in SAMPLER_WEIGHTS:
            raise ValueError(
                f"config.lora.sampler_weights must be one of {SAMPLER_WEIGHTS}, got {self.sampler_weights!r}"
            )

    @property
    def scale(self) -> float:
        """α/r, the factor of B·A in W' = W + (α/r)·B·A."""
        return self.alpha / self.rank

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoRAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config.lora: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), targets=list(self.targets))


@flax.struct.dataclass
class FrozenBase:
    """The frozen weights a LoRA stage adapts (a model's params; never differentiated or updated) and
    the adapters' scale α/r (static: part of the tree's structure, not an array)."""

    params: Any
    scale: float = flax.struct.field(pytree_node=False, default=1.0)


# ----------------------------------------------------------------------------------------------
# Shapes, axes, init, shardings
# ----------------------------------------------------------------------------------------------


def adapter_shapes(model_config: ModelConfig, lora: LoRAConfig) -> dict:
    """Shape of every adapter leaf: {"layers": {"lora": {target: {"a": (L, *in, r), "b": (L, r, *out)}}}}."""
    weights = param_shapes(model_config)["layers"]
    tree = {}
    for target in lora.targets:
        shape, n_in = weights[target], _INPUT_DIMS[target]
        tree[target] = {
            "a": (shape[0], *shape[1 : 1 + n_in], lora.rank),
            "b": (shape[0], lora.rank, *shape[1 + n_in :]),
        }
    return {"layers": {LORA_KEY: tree}}


def adapter_axes(model_config: ModelConfig, lora: LoRAConfig) -> dict:
    """Logical axes of every adapter leaf: A the weight's input axes, B its output axes, rank replicated."""
    weights = logical_axes(model_config)["layers"]
    tree = {}
    for target in lora.targets:
        axes, n_in = weights[target], _INPUT_DIMS[target]
        tree[target] = {
            "a": (axes[0], *axes[1 : 1 + n_in], RANK_AXIS),
            "b": (axes[0], RANK_AXIS, *axes[1 + n_in :]),
        }
    return {"layers": {LORA_KEY: tree}}


def init_adapters(model_config: ModelConfig, lora: LoRAConfig, rng: jax.Array) -> dict:
    """Fresh adapters in the model's weight dtype: A ~ U(−1/√fan_in, 1/√fan_in) (PEFT's
    `kaiming_uniform_(a=√5)`), B = 0, so attaching them changes nothing until B is trained."""
    shapes = adapter_shapes(model_config, lora)["layers"][LORA_KEY]
    keys = jax.random.split(rng, len(shapes))
    dtype = model_config.weight_dtype
    tree = {}
    for key, (target, pair) in zip(keys, shapes.items()):
        fan_in = math.prod(pair["a"][1:-1])
        bound = 1.0 / math.sqrt(fan_in)
        tree[target] = {
            "a": jax.random.uniform(key, pair["a"], jnp.float32, -bound, bound).astype(dtype),
            "b": jnp.zeros(pair["b"], dtype),
        }
    return {"layers": {LORA_KEY: tree}}


def adapter_shardings(mesh, model_config: ModelConfig, lora: LoRAConfig, rules=None):
    """NamedSharding of every adapter leaf from its logical axes (`model.strict_sharding` as for weights)."""
    strict = resolve_strict(model_config.strict_sharding, mesh)
    return param_shardings(
        mesh, adapter_axes(model_config, lora), adapter_shapes(model_config, lora), rules, strict=strict
    )


def init_sharded_adapters(model_config: ModelConfig, lora: LoRAConfig, rng: jax.Array, mesh, rules=None):
    """`init_adapters` created directly in their shardings."""
    shardings = adapter_shardings(mesh, model_config, lora, rules)
    return jax.jit(lambda r: init_adapters(model_config, lora, r), out_shardings=shardings)(rng)


# ----------------------------------------------------------------------------------------------
# Base + adapters -> the params the model takes
# ----------------------------------------------------------------------------------------------


def attach(base: FrozenBase | None, params):
    """The params the model functions take: `params` itself without a base; else the base's tree with
    the adapters of `params` under `layers/lora`, each B multiplied by α/r (and any other leaf of
    `params`, e.g. a reward head, alongside). Differentiable in `params`; the base enters as is."""
    if base is None:
        return params
    return _overlay(base.params, params, base.scale)


def _overlay(base, params, scale):
    out = dict(base)
    for key, value in params.items():
        if key == LORA_KEY:
            out[key] = {
                t: {"a": ab["a"], "b": ab["b"] * jnp.asarray(scale, ab["b"].dtype)} for t, ab in value.items()
            }
        elif isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            out[key] = _overlay(base[key], value, scale)
        else:
            out[key] = value
    return out


def attach_backbone(base: FrozenBase | None, params: dict) -> dict:
    """`attach` for a `{"backbone", "head"}` model (a reward model, PPO's critic) whose backbone is the
    adapted one: `{"backbone": attach(base, params["backbone"]), "head": params["head"]}`."""
    if base is None:
        return params
    return dict(params, backbone=attach(base, params["backbone"]))


def merge(tree, dtype=None):
    """`tree` (params with adapters under `layers/lora`, as `attach` makes them) with every adapted
    weight replaced by W + (α/r)·B·A (computed in float32, stored in `dtype`, default the weight's) and
    the adapters dropped: plain model params. Untouched leaves are the same arrays."""
    return _replace(tree, merged_weights(tree, dtype))


def merged_weights(tree, dtype=None) -> dict:
    """Only the adapted weights of `tree`, merged (see `merge`): a tree with just those paths."""
    out = {}
    adapters = tree.get(LORA_KEY) if isinstance(tree, Mapping) else None
    for key, value in tree.items() if isinstance(tree, Mapping) else ():
        if adapters is not None and key in adapters:
            out[key] = merged_weight(value, adapters[key]["a"], adapters[key]["b"], dtype)
        elif isinstance(value, Mapping) and key != LORA_KEY:
            inner = merged_weights(value, dtype)
            if inner:
                out[key] = inner
    return out


def _replace(tree, merged):
    """`tree` without its adapters, with the leaves of `merged` in their places."""
    out = {}
    for key, value in tree.items():
        if key == LORA_KEY:
            continue
        if key in merged:
            out[key] = _replace(value, merged[key]) if isinstance(value, Mapping) else merged[key]
        else:
            out[key] = value
    return out


class Merger:
    """`merger(base, params)` -> plain model params with the adapted weights merged (`merge`), made by one
    jitted program that computes only those weights, each in its base weight's sharding; every other
    leaf is the base's own array (no copy). `attach_fn`: `attach`, or `attach_backbone` for a
    `{"backbone", "head"}` model; `dtype`: the merged weights' dtype (None: each base weight's);
    `cast_rest`: the other leaves are converted to `dtype` too (a stage result over a bfloat16 base is
    plain params in the model's weight dtype throughout)."""

    def __init__(self, dtype=None, attach_fn=None, *, cast_rest: bool = False):
        self.dtype = None if dtype is None else jnp.dtype(dtype)
        self.attach_fn = attach if attach_fn is None else attach_fn
        self.cast_rest = cast_rest and self.dtype is not None
        self._merge = None

    def __call__(self, base: FrozenBase, params):
        tree = self.attach_fn(base, params)
        if self._merge is None:
            shapes = jax.eval_shape(
                lambda b, p: merged_weights(self.attach_fn(b, p), self.dtype), base, params
            )
            shardings = _select(jax.tree_util.tree_map(lambda x: x.sharding, tree), shapes)
            self._merge = jax.jit(
                lambda b, p: merged_weights(self.attach_fn(b, p), self.dtype), out_shardings=shardings
            )
        if self.cast_rest:
            tree = jax.tree_util.tree_map(
                lambda x: x if x.dtype == self.dtype else x.astype(self.dtype), tree
            )
        return _replace(tree, self._merge(base, params))


def _select(tree, like):
    """The subtree of `tree` at the paths of `like`."""
    return {k: _select(tree[k], v) if isinstance(v, Mapping) else tree[k] for k, v in like.items()}


def merged_weight(w, a, b, dtype=None):
    """W + A·B for one stacked weight W [L, *in, *out], A [L, *in, r], B [L, r, *out] (B already scaled)."""
    layers, rank = a.shape[0], a.shape[-1]
    delta = jnp.matmul(
        a.reshape(layers, -1, rank).astype(jnp.float32), b.reshape(layers, rank, -1).astype(jnp.float32)
    )
    merged = w.astype(jnp.float32) + delta.reshape(w.shape)
    return merged.astype(w.dtype if dtype is None else dtype)


def cast_base(params, dtype):
    """The base's params in storage `dtype` ("" or None: unchanged). A new buffer either way, so the
    base never aliases the start params it came from (which may be donated or dropped)."""
    if not dtype:
        return jax.tree_util.tree_map(jnp.copy, params)
    dtype = jnp.dtype(dtype)
    return jax.tree_util.tree_map(lambda x: jnp.copy(x) if x.dtype == dtype else x.astype(dtype), params)


# ----------------------------------------------------------------------------------------------
# The base's fingerprint
# ----------------------------------------------------------------------------------------------


@jax.jit
def _leaf_checksums(tree):
    """Two uint32 sums per leaf over its raw bits (a plain sum and a position-weighted one): integer
    arithmetic, so the result is exact whatever the sharding or reduction order."""

    def sums(x):
        bits = jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
        bits = bits.astype(jnp.uint32).reshape(-1)
        weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
        return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])

    return jax.tree_util.tree_map(sums, tree)


def fingerprint(params) -> str:
    """A short hash of a params tree's shapes, dtypes and exact bits (16 hex characters): what a LoRA
    checkpoint records of the base its adapters were trained on, so a resume or an export over a
    different base is refused."""
    sums = jax.device_get(_leaf_checksums(params))
    digest = hashlib.sha256()
    for (path, leaf), (_, value) in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_flatten_with_path(sums)[0]
    ):
        digest.update(f"{jax.tree_util.keystr(path)}:{tuple(leaf.shape)}:{leaf.dtype}:".encode())
        digest.update(np.asarray(value, np.uint32).tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# PEFT format
# ----------------------------------------------------------------------------------------------


def _peft_name(layer: int, target: str, side: str) -> str:
    return f"base_model.model.model.layers.{layer}.{HF_MODULES[target]}.lora_{side.upper()}.weight"


def save_peft_adapter(
    lora: LoRAConfig,
    adapters: dict,
    path: str,
    *,
    base_model: str = "",
    model_config: ModelConfig | None = None,
    base_from: str = "",
    base_fingerprint: str = "",
) -> None:
    """Write a PEFT LoRA adapter directory: `adapter_config.json` (r, lora_alpha, target_modules) and
    `adapter_model.safetensors` with HF's layout (lora_A [r, in], lora_B [out, r] per layer and module;
    B without the α/r scale, which PEFT applies). `base_model` names the HF model it adapts (PEFT's
    `base_model_name_or_path`); `base_from`, `base_fingerprint` (`fingerprint` of the base's params)
    and `model_config` (which weights of a training workdir it adapts, the model's shapes) go to
    `grpo_jax_adapter.json` beside them, which PEFT does not read."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    tree = jax.device_get(adapters["layers"][LORA_KEY])
    tensors = {}
    for target in lora.targets:
        a, b = np.asarray(tree[target]["a"]), np.asarray(tree[target]["b"])
        for layer in range(a.shape[0]):
            tensors[_peft_name(layer, target, "a")] = np.ascontiguousarray(a[layer].reshape(-1, lora.rank).T)
            tensors[_peft_name(layer, target, "b")] = np.ascontiguousarray(b[layer].reshape(lora.rank, -1).T)
    save_file(tensors, os.path.join(path, PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "target_modules": [HF_MODULES[t].split(".")[-1] for t in lora.targets],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    with open(os.path.join(path, PEFT_CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    ours = {
        "lora": lora.to_dict(),
        "base_from": base_from or base_model or None,
        "base_fingerprint": base_fingerprint or None,
        "model": None if model_config is None else model_config.to_dict(),
    }
    with open(os.path.join(path, ADAPTER_INFO_FILE), "w") as f:
        json.dump(ours, f, indent=2)


def read_peft_config(path: str) -> LoRAConfig:
    """The LoRAConfig of a PEFT adapter directory; anything this code cannot reproduce (DoRA, rsLoRA,
    per-module ranks, biases, modules outside `TARGETS`) raises one line naming the field."""
    file = os.path.join(path, PEFT_CONFIG_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no {PEFT_CONFIG_FILE} (expected a PEFT LoRA adapter directory)")
    with open(file) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: peft_type={config.get('peft_type')!r}, only 'LORA' is supported")
    for field in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save"):
        if config.get(field):
            raise ValueError(f"{file}: {field}={config[field]!r} is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{file}: bias={config['bias']!r} is not supported (only 'none')")
    modules = config.get("target_modules") or []
    modules = [modules] if isinstance(modules, str) else list(modules)
    by_module = {HF_MODULES[t].split(".")[-1]: t for t in TARGETS}
    unknown = [m for m in modules if m not in by_module]
    if unknown or not modules:
        raise ValueError(f"{file}: target_modules {modules} must be among {sorted(by_module)}")
    return LoRAConfig(
        rank=int(config["r"]), alpha=float(config["lora_alpha"]), targets=tuple(by_module[m] for m in modules)
    )


def load_peft_adapter(path: str, model_config: ModelConfig, *, mesh=None) -> tuple[LoRAConfig, dict]:
    """Read a PEFT LoRA adapter directory for `model_config`'s shapes -> (LoRAConfig, adapters in the
    model's weight dtype, in their shardings on `mesh` when given). Missing or misshapen tensors raise
    naming them."""
    from safetensors import safe_open

    lora = read_peft_config(path)
    file = os.path.join(path, PEFT_WEIGHTS_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no {PEFT_WEIGHTS_FILE}")
    shapes = adapter_shapes(model_config, lora)["layers"][LORA_KEY]
    dtype = np.dtype(model_config.weight_dtype)
    tree = {}
    with safe_open(file, framework="numpy") as f:
        names = set(f.keys())
        for target, pair in shapes.items():
            arrays = {}
            for side, shape in pair.items():
                per_layer = []
                hf_shape = (
                    (lora.rank, math.prod(shape[1:-1])) if side == "a" else (math.prod(shape[2:]), lora.rank)
                )
                for layer in range(shape[0]):
                    name = _peft_name(layer, target, side)
                    if name not in names:
                        raise ValueError(f"{file}: missing tensor {name!r}")
                    value = f.get_tensor(name)
                    if tuple(value.shape) != hf_shape:
                        raise ValueError(
                            f"{file}: tensor {name!r} has shape {tuple(value.shape)}, expected {hf_shape}"
                        )
                    per_layer.append(value.astype(np.float32).T.reshape(shape[1:]))
                arrays[side] = np.stack(per_layer).astype(dtype)
            tree[target] = arrays
    adapters = {"layers": {LORA_KEY: tree}}
    if mesh is None:
        return lora, jax.tree_util.tree_map(jnp.asarray, adapters)
    shardings = adapter_shardings(mesh, model_config, lora)
    return lora, jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s), adapters, shardings)
