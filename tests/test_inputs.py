"""What the public API accepts for PRNG keys and dtypes (grpo_jax.inputs), and the model entry points
that take them: ModelConfig, init_params, init_cache, load_pretrained."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from grpo_jax import models
from grpo_jax.inputs import as_key, canonical_dtype
from grpo_jax.testing import tiny_model_config

# ------------------------------------------------------------------------------------------------
# PRNG keys
# ------------------------------------------------------------------------------------------------


def test_as_key_accepts_typed_and_raw_keys_alike():
    typed = jax.random.key(3)
    assert as_key(typed) is typed
    for raw in (jax.random.PRNGKey(3), np.asarray(jax.random.PRNGKey(3))):
        key = as_key(raw)
        assert jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()
        np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(typed))
    # Under jit (a tracer) the same rules apply.
    draw = jax.jit(lambda k: jax.random.uniform(as_key(k)))
    assert float(draw(jax.random.PRNGKey(3))) == float(draw(typed))


@pytest.mark.parametrize(
    "value, error, message",
    [
        (7, TypeError, r"^seed must be a PRNG key \(jax.random.key\(seed\), .*\), got int 7$"),
        (1.5, TypeError, r"got float 1.5$"),
        ("key", TypeError, r"got str 'key'$"),
        (np.zeros(2, np.float32), TypeError, r"got an array of dtype float32 and shape \(2,\)$"),
        (np.zeros(2, np.int32), TypeError, r"got an array of dtype int32 and shape \(2,\)$"),
        (np.zeros(4, np.uint32), ValueError, r"^seed must be a single PRNG key; .* got shape \(4,\)$"),
    ],
)
def test_as_key_rejects_non_keys_in_one_line(value, error, message):
    with pytest.raises(error, match=message) as info:
        as_key(value, "seed")
    assert "\n" not in str(info.value)


def test_as_key_rejects_a_batch_of_typed_keys():
    with pytest.raises(ValueError, match=r"^rng must be a single PRNG key, got a key array of shape \(2,\)$"):
        as_key(jax.random.split(jax.random.key(0)))


def test_init_params_gives_the_same_params_for_a_raw_and_a_typed_key():
    config = tiny_model_config()
    from_raw = models.init_params(config, jax.random.PRNGKey(5))
    from_typed = models.init_params(config, jax.random.key(5))
    from_wrapped = models.init_params(config, jax.random.wrap_key_data(jax.random.PRNGKey(5)))
    for other in (from_typed, from_wrapped):
        jax.tree_util.tree_map(np.testing.assert_array_equal, from_raw, other)
    with pytest.raises(TypeError, match=r"^init_params\(rng\) must be a PRNG key"):
        models.init_params(config, 5)


# ------------------------------------------------------------------------------------------------
# Dtypes
# ------------------------------------------------------------------------------------------------

SPELLINGS = {
    "bfloat16": ["bfloat16", "bf16", "BF16", jnp.bfloat16, jnp.dtype("bfloat16"), np.dtype(jnp.bfloat16)],
    "float32": ["float32", "fp32", "f32", jnp.float32, np.float32, np.dtype("float32"), jnp.dtype("float32")],
    "float16": ["float16", "fp16", "f16", jnp.float16, np.float16, np.dtype("float16")],
}


@pytest.mark.parametrize("canonical", sorted(SPELLINGS))
def test_canonical_dtype_accepts_names_aliases_and_dtype_objects(canonical):
    for spelling in SPELLINGS[canonical]:
        assert canonical_dtype(spelling) == canonical, spelling


@pytest.mark.parametrize(
    "value, shown",
    [("float64", "'float64'"), (np.float64, "float64"), ("int8", "'int8'"), (None, "None"), (16, "16")],
)
def test_a_bad_dtype_gets_one_line_naming_the_argument_and_the_accepted_values(value, shown):
    with pytest.raises(ValueError) as info:
        canonical_dtype(value, "ModelConfig.dtype")
    assert str(info.value) == (
        "ModelConfig.dtype must be one of float32, bfloat16, float16 (a name, an alias such as 'bf16', "
        f"or a dtype such as jnp.bfloat16), got {shown}"
    )


def test_model_config_stores_the_canonical_name_whatever_the_spelling():
    reference = tiny_model_config(dtype="bfloat16", param_dtype="float32")
    for dtype in SPELLINGS["bfloat16"]:
        for param_dtype in SPELLINGS["float32"]:
            config = tiny_model_config(dtype=dtype, param_dtype=param_dtype)
            assert (config.dtype, config.param_dtype) == ("bfloat16", "float32")
            assert config == reference and hash(config) == hash(reference)  # one jit cache entry
    assert reference.compute_dtype == jnp.bfloat16 and reference.weight_dtype == jnp.float32
    # What a workdir or a benchmark JSON stores stays a plain string and reads back equal.
    d = json.loads(json.dumps(tiny_model_config(dtype=jnp.bfloat16).to_dict()))
    assert d["dtype"] == "bfloat16"
    assert models.ModelConfig.from_dict(d) == tiny_model_config(dtype="bf16")
    # ml_collections config values (as `--config.model.dtype=bf16` gives them) work too.
    section = ml_collections.ConfigDict({"dtype": "bf16"})
    assert tiny_model_config(dtype=section.dtype).dtype == "bfloat16"
    with pytest.raises(
        ValueError, match=r"^ModelConfig.param_dtype must be one of float32, bfloat16, float16"
    ):
        tiny_model_config(param_dtype="float64")


def test_init_params_and_init_cache_follow_the_dtypes():
    config = tiny_model_config(param_dtype=jnp.bfloat16, dtype=np.float32)
    params = models.init_params(config, jax.random.key(0))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype("bfloat16")}
    assert models.init_cache(config, 2, 8)["k"].dtype == jnp.float32
    for spelling in ("bf16", jnp.bfloat16, jnp.dtype("bfloat16")):
        assert models.init_cache(config, 2, 8, dtype=spelling)["v"].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"^init_cache\(dtype\) must be one of"):
        models.init_cache(config, 2, 8, dtype="int4")


@pytest.fixture(scope="module")
def hf_directory(tmp_path_factory):
    config = tiny_model_config()
    path = tmp_path_factory.mktemp("hf") / "tiny"
    models.save_pretrained(config, models.init_params(config, jax.random.key(0)), str(path))
    return str(path)


@pytest.mark.parametrize(
    "dtype", ["bfloat16", "bf16", jnp.bfloat16, jnp.dtype("bfloat16"), np.dtype(jnp.bfloat16)]
)
def test_load_pretrained_takes_a_dtype_in_any_spelling(hf_directory, dtype):
    config, params = models.load_pretrained(hf_directory, dtype=dtype)
    assert (config.dtype, config.param_dtype) == ("bfloat16", "float32")  # weights as stored
    assert params["embed"].dtype == jnp.float32
    config, params = models.load_pretrained(hf_directory, param_dtype=dtype)
    assert (config.dtype, config.param_dtype) == ("bfloat16", "bfloat16")  # compute follows the weights
    assert params["layers"]["q"].dtype == jnp.bfloat16
    logits = models.forward(config, params, jnp.asarray([[3, 4, 5]]))
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_load_pretrained_rejects_a_bad_dtype_naming_the_argument(hf_directory):
    with pytest.raises(
        ValueError, match=r"^load_pretrained\(dtype=\.\.\.\) must be one of float32, bfloat16"
    ):
        models.load_pretrained(hf_directory, dtype="float64")
    with pytest.raises(
        ValueError, match=r"^load_pretrained\(param_dtype=\.\.\.\) must be one of .*got int8$"
    ):
        models.load_pretrained(hf_directory, param_dtype=np.int8)
