"""The rollout engine's decode layout: the policy's weights cast to the compute dtype, placed without
their fsdp split (over `tensor` only) and unstacked per layer, once per rollout, so the decode loop reads
each weight where it lies (docs/ARCHITECTURE.md, "The rollout engine")."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from grpo_jax.models import ModelConfig, logical_axes, param_shapes
from grpo_jax.sharding import DEFAULT_RULES, logical_to_spec

# The training rules without the fsdp split: decode weights over `tensor` only, whole on every row shard.
DECODE_RULES = tuple((name, None if name == "embed" else axes) for name, axes in DEFAULT_RULES)


def decode_specs(model_config: ModelConfig, mesh) -> dict:
    """The PartitionSpec of every model weight in the decode layout (`decode_params`' tree, without LoRA
    adapters): `DECODE_RULES` over each weight's logical axes, the layer stack as a tuple of layers."""
    axes, shapes = logical_axes(model_config), param_shapes(model_config)
    spec = lambda logical, shape: logical_to_spec(logical, shape, mesh, DECODE_RULES)  # noqa: E731
    out = {name: spec(axes[name], shapes[name]) for name in axes if name != "layers"}
    layer = {name: spec(axes["layers"][name][1:], shape[1:]) for name, shape in shapes["layers"].items()}
    out["layers"] = tuple(dict(layer) for _ in range(model_config.num_layers))
    return out


def decode_params(model_config: ModelConfig, params, mesh=None):
    """The policy in the decode layout (traceable; the engine calls it once per rollout, before its loop):
    every float leaf cast to the compute dtype; on a mesh, every model weight constrained to `DECODE_RULES`
    (`decode_specs`: its fsdp split gathered once, `tensor` kept; the loop then reads each weight where it
    lies instead of casting and all-gathering every layer at every token); and the layer stack unstacked
    into a tuple of per-layer weights, so the decode step's unrolled layers read them in place (a scan
    copies each layer's slice out of the stacked params at every step). LoRA adapters under `layers/lora`
    are cast and unstacked, not placed."""
    dtype = model_config.compute_dtype
    specs = None if mesh is None else decode_specs(model_config, mesh)

    def place(x, spec):
        if jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(dtype)
        if spec is None:
            return x
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))

    top = {
        name: jax.tree_util.tree_map(lambda a, name=name: place(a, specs and specs.get(name)), value)
        for name, value in params.items()
        if name != "layers"
    }

    def layer(i):
        spec = lambda name: None if specs is None or name == "lora" else specs["layers"][i][name]  # noqa: E731
        return {
            name: jax.tree_util.tree_map(lambda a, name=name: place(a[i], spec(name)), value)
            for name, value in params["layers"].items()
        }

    return dict(top, layers=tuple(layer(i) for i in range(model_config.num_layers)))
