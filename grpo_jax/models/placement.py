"""Where a model's params live on a mesh: their shardings from the logical axes, and a sharded init.

`grpo_jax.sharding` maps logical axis names to mesh axes for any pytree and knows nothing of models;
this module applies it to the decoder's params (`logical_axes`, `param_shapes`).
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from grpo_jax.models.config import ModelConfig
from grpo_jax.models.transformer import init_params, logical_axes, param_shapes
from grpo_jax.sharding import param_shardings, resolve_strict


def model_param_shardings(mesh: Mesh, model_config: ModelConfig, rules=None):
    """NamedSharding for every param of `model_config`'s decoder, from its logical axes and shape; with
    `model_config.strict_sharding` on (by default off CPU), a rule that cannot apply raises naming the
    parameter and the mesh axis instead of replicating it."""
    strict = resolve_strict(model_config.strict_sharding, mesh)
    return param_shardings(mesh, logical_axes(model_config), param_shapes(model_config), rules, strict=strict)


def init_sharded_params(model_config: ModelConfig, rng: jax.Array, mesh: Mesh, rules=None):
    """Initialise params directly in their sharding: shapes via `jax.eval_shape`, then a jitted init with
    `out_shardings`, so no device ever holds the full unsharded model."""
    shardings = model_param_shardings(mesh, model_config, rules)
    jax.eval_shape(lambda r: init_params(model_config, r), rng)  # validates shapes before allocating
    return jax.jit(lambda r: init_params(model_config, r), out_shardings=shardings)(rng)
