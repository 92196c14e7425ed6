"""Remat policies by name and the layout of the layers' activations: every policy computes the same loss
and gradients and keeps exactly what it names for the backward; q/k/v heads and the MLP hidden are laid
out over "tensor" inside the layers; strict sharding refuses a rule that would silently replicate a
parameter, naming it and the mesh axis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals
from jax.sharding import PartitionSpec as P

from grpo_jax import models, sharding
from grpo_jax.models.config import REMAT_POLICIES
from grpo_jax.models.transformer import ATTENTION_NAMES, QKV_NAMES, _constrain
from grpo_jax.testing import tiny_model_config, tiny_params

TOKENS = jnp.asarray(np.random.default_rng(0).integers(2, 32, (2, 6)), jnp.int32)


def _loss(config):
    return lambda params: jnp.sum(models.forward(config, params, TOKENS) ** 2) * 1e-3


def _named(config, params) -> set[str]:
    """The checkpoint names among what the backward keeps from the forward."""
    return {d.split("'")[1] for _, d in saved_residuals(_loss(config), params) if d.startswith("named '")}


CPU_POLICIES = [p for p in REMAT_POLICIES if not p.startswith("offload")]  # offloading needs device memory


@pytest.mark.parametrize("remat", CPU_POLICIES)
def test_every_remat_policy_gives_the_same_gradients_and_keeps_what_it_names(remat):
    base = tiny_model_config(vocab_size=32, num_layers=1, scan_layers=False)
    config = base.replace(remat=remat)
    params = tiny_params(base)
    want_loss, want = jax.jit(jax.value_and_grad(_loss(base)))(params)
    loss, grads = jax.jit(jax.value_and_grad(_loss(config)))(params)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), grads, want)
    expected = {
        "full": set(),
        "save_qkv_proj": set(QKV_NAMES),
        "save_attention": set(ATTENTION_NAMES),
    }
    if remat in expected:
        assert _named(config, params) == expected[remat]
    elif remat == "none":
        assert _named(config, params) >= {"key_proj", "value_proj"}  # everything is kept


def test_layer_activations_are_laid_out_over_tensor():
    """Inside `activation_sharding`, q/k/v and the attention output put their heads and the MLP hidden its
    width on "tensor" and rows on the batch axes; a dimension the axis does not divide stays whole."""
    mesh = sharding.make_mesh((1, 2, 4))
    cases = {
        ("batch", "length", "heads", "head_dim"): ((4, 3, 8, 2), P(("data", "fsdp"), None, "tensor", None)),
        ("batch", "length", "kv_heads", "head_dim"): ((4, 3, 2, 2), P(("data", "fsdp"), None, None, None)),
        ("batch", "length", "mlp"): ((4, 3, 16), P(("data", "fsdp"), None, "tensor")),
    }
    for logical, (shape, spec) in cases.items():
        with models.activation_sharding(mesh):
            out = jax.jit(lambda x, logical=logical: _constrain(x, logical))(jnp.ones(shape))
        assert out.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), len(shape)), logical
    assert _constrain(jnp.ones((4, 3, 8, 2)), ("batch", "length", "heads", "head_dim")).shape == (4, 3, 8, 2)


def test_strict_sharding_names_the_parameter_and_the_axis():
    """4 KV heads over tensor = 8 would leave K/V copied on every tensor device: strict refuses it in one
    line; "auto" is lenient on a CPU mesh (and strict on TPU/GPU meshes); "off" never refuses."""
    mesh = sharding.make_mesh((1, 1, 8))
    config = tiny_model_config(num_heads=8, num_kv_heads=4, hidden_size=64)
    with pytest.raises(
        ValueError, match=r"\['layers'\]\['k'\]: logical axis 'kv_heads' \(4\) does not divide"
    ):
        models.model_param_shardings(mesh, config.replace(strict_sharding="on"))
    for lenient in ("auto", "off"):
        shardings = models.model_param_shardings(mesh, config.replace(strict_sharding=lenient))
        assert "tensor" not in jax.tree_util.tree_leaves(tuple(shardings["layers"]["k"].spec))  # replicated
        assert shardings["layers"]["q"].spec[2] == "tensor"
    assert sharding.resolve_strict("auto", mesh) is False
    with pytest.raises(ValueError, match="strict_sharding must be one of"):
        config.replace(strict_sharding="yes")
