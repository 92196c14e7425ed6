"""LoRA adapters (grpo_jax.models.lora; W' = W + (α/r)·B·A, docs/ALGORITHMS.md): a fresh adapter leaves the
model exactly as it was; the unmerged x·A·B forward and its gradients equal autodiff of the merged weights;
adapters shard like the weights they adapt; a LoRA train state holds no reference copy and a GRPO update
changes only the adapters (the base bit for bit untouched); the PEFT format round-trips through `peft`
onto the transformers model with equal logits; the base's fingerprint is exact under any sharding.
The end-to-end runs (every stage kind on adapters, resume after SIGKILL) are tests/test_lora_train.py."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import models, sampling, sharding
from grpo_jax.algorithms import GRPOConfig
from grpo_jax.models import lora as lora_lib
from grpo_jax.models.lora import FrozenBase, LoRAConfig, attach
from grpo_jax.testing import mesh_2x2x2, tiny_model_config, tiny_params
from grpo_jax.training import (
    OptimizerConfig,
    create_train_state,
    make_grpo_step,
    make_optimizer,
    reset_reference,
    rollout_to_batch,
)
from grpo_jax.training.state import policy_params, reference_params

CONFIG = tiny_model_config(vocab_size=32, qkv_bias=True)
LORA = LoRAConfig(rank=4, alpha=8.0)
TOKENS = jnp.asarray(np.arange(24).reshape(2, 12) % 32, jnp.int32)
MASK = jnp.asarray(np.r_[[[0, 0] + [1] * 10], [[1] * 12]], jnp.int32)


def _trained_adapters(lora=LORA, seed=1, config=CONFIG):
    """Adapters as after some training: A from the init, B random and non-zero."""
    adapters = lora_lib.init_adapters(config, lora, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 100), len(lora.targets)))
    for pair in adapters["layers"]["lora"].values():
        pair["b"] = 0.05 * jax.random.normal(next(keys), pair["b"].shape)
    return adapters


def _logits(params, config=CONFIG):
    return models.forward(config, params, TOKENS, attention_mask=MASK)


def test_fresh_adapters_leave_the_model_exactly_as_it_was():
    base = tiny_params(CONFIG)
    adapters = lora_lib.init_adapters(CONFIG, LORA, jax.random.key(3))
    pairs = adapters["layers"]["lora"]
    assert all(np.all(np.asarray(p["b"]) == 0) and np.any(np.asarray(p["a"]) != 0) for p in pairs.values())
    a = np.asarray(pairs["q"]["a"])
    assert np.abs(a).max() <= 1 / np.sqrt(CONFIG.hidden_size)  # Kaiming-uniform bound 1/sqrt(fan_in)
    attached = attach(FrozenBase(base, LORA.scale), adapters)
    np.testing.assert_array_equal(_logits(attached), _logits(base))  # bit for bit, not approximately


def _merged_by_hand(base, adapters, scale):
    """W + scale · A·B for every adapted weight, written independently of lora.merge."""
    layers = dict(base["layers"])
    for target, pair in adapters["layers"]["lora"].items():
        w, a, b = layers[target], pair["a"], pair["b"]
        n_in = a.ndim - 2  # leading layer axis, trailing rank
        delta = jnp.tensordot(a, b, axes=[[a.ndim - 1], [1]])  # [L, *in, L, *out]
        delta = jnp.stack([delta[(i,) + (slice(None),) * n_in + (i,)] for i in range(w.shape[0])])
        layers[target] = w + scale * delta
    return dict(base, layers=layers)


def test_the_adapter_forward_and_its_gradients_equal_autodiff_of_the_merged_weights():
    base = tiny_params(CONFIG)
    adapters = _trained_adapters()
    weights = jax.random.normal(jax.random.key(9), (2, 12, CONFIG.vocab_size))

    def unmerged(ad):
        return jnp.sum(_logits(attach(FrozenBase(base, LORA.scale), ad)) * weights)

    def merged(ad):
        return jnp.sum(_logits(_merged_by_hand(base, ad, LORA.scale)) * weights)

    value, grads = jax.jit(jax.value_and_grad(unmerged))(adapters)
    value_ref, grads_ref = jax.jit(jax.value_and_grad(merged))(adapters)
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        g_ref = grads_ref
        for key in path:
            g_ref = g_ref[key.key]
        assert np.abs(np.asarray(g)).max() > 0, path  # every adapter leaf gets a gradient
        np.testing.assert_allclose(g, g_ref, rtol=2e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    # lora.merge / Merger make the same weights (the sampler's and the stage result's path).
    merged_params = lora_lib.Merger()(FrozenBase(base, LORA.scale), adapters)
    assert merged_params["embed"] is base["embed"] and "lora" not in merged_params["layers"]
    np.testing.assert_allclose(
        _logits(merged_params), _logits(_merged_by_hand(base, adapters, LORA.scale)), atol=2e-5
    )


def test_targets_pick_the_adapted_projections_and_bad_settings_fail_in_one_line():
    only_qv = LoRAConfig(rank=2, targets=("v", "q"))
    assert only_qv.targets == ("q", "v")  # canonical order
    shapes = lora_lib.adapter_shapes(CONFIG, only_qv)["layers"]["lora"]
    H, K, Dh, D = CONFIG.num_heads, CONFIG.num_kv_heads, CONFIG.resolved_head_dim, CONFIG.hidden_size
    assert shapes == {"q": {"a": (2, D, 2), "b": (2, 2, H, Dh)}, "v": {"a": (2, D, 2), "b": (2, 2, K, Dh)}}
    o = lora_lib.adapter_shapes(CONFIG, LORA)["layers"]["lora"]["o"]
    assert o == {"a": (2, H, Dh, 4), "b": (2, 4, D)}
    for bad, field in [
        (dict(rank=0), "rank"),
        (dict(targets=("q", "mlp")), "targets"),
        (dict(alpha=0.0), "alpha"),
        (dict(base_dtype="int8"), "base_dtype"),
        (dict(sampler_weights="both"), "sampler_weights"),
    ]:
        with pytest.raises(ValueError, match=f"config.lora.{field}") as error:
            LoRAConfig(**bad)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="unknown key"):
        LoRAConfig.from_dict({"rank": 2, "dropout": 0.1})


def test_adapters_shard_like_the_weights_they_adapt():
    """A carries the weight's input axes, B its output axes; the rank is replicated."""
    mesh = mesh_2x2x2()
    config = tiny_model_config(num_heads=4, num_kv_heads=2)
    specs = jax.tree_util.tree_map(
        lambda s: tuple(s.spec), lora_lib.adapter_shardings(mesh, config, LORA)["layers"]["lora"]
    )
    weights = jax.tree_util.tree_map(
        lambda s: tuple(s.spec), models.model_param_shardings(mesh, config)["layers"]
    )
    assert specs["q"]["a"] == (None, "fsdp", None) == weights["q"][:2] + (None,)
    assert specs["q"]["b"] == (None, None, "tensor", None)
    assert specs["o"]["a"] == (None, "tensor", None, None) and specs["o"]["b"] == (None, None, "fsdp")
    assert specs["up"]["a"] == (None, "fsdp", None) and specs["up"]["b"] == (None, None, "tensor")
    assert specs["down"]["a"] == (None, "tensor", None) and specs["down"]["b"] == (None, None, "fsdp")


def test_the_fingerprint_is_exact_whatever_the_sharding():
    params = tiny_params(CONFIG)
    mesh = mesh_2x2x2()
    sharded = jax.device_put(params, models.model_param_shardings(mesh, CONFIG))
    assert lora_lib.fingerprint(sharded) == lora_lib.fingerprint(params)
    nudged = params["final_norm"].at[3].set(np.nextafter(params["final_norm"][3], np.float32(2)))
    flipped = dict(params, final_norm=nudged)
    assert lora_lib.fingerprint(flipped) != lora_lib.fingerprint(params)
    half = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    assert lora_lib.fingerprint(half) != lora_lib.fingerprint(params)


# ------------------------------------------------------------------------------------------------
# The train state and a GRPO update on adapters
# ------------------------------------------------------------------------------------------------


def _lora_state(optimizer, mesh, *, base_dtype="", with_reference=False):
    shardings = models.model_param_shardings(mesh, CONFIG)
    params = jax.device_put(tiny_params(CONFIG), shardings)
    adapters = lora_lib.init_sharded_adapters(CONFIG, LORA, jax.random.key(4), mesh)
    state, state_sh = create_train_state(
        adapters,
        optimizer,
        mesh,
        lora_lib.adapter_shardings(mesh, CONFIG, LORA),
        rng=jax.random.key(0),
        with_reference=with_reference,
        base=FrozenBase(params, LORA.scale),
        base_shardings=FrozenBase(shardings, LORA.scale),
        base_dtype=base_dtype,
    )
    return params, state, state_sh


def _leaf_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def test_a_lora_grpo_update_trains_only_the_adapters_against_the_base_as_reference():
    mesh = mesh_2x2x2()
    grpo = GRPOConfig(num_generations=4, kl_coef=0.05, temperature=1.0)
    opt_config = OptimizerConfig(learning_rate=1e-2)
    optimizer = make_optimizer(opt_config)
    params, state, state_sh = _lora_state(optimizer, mesh)
    assert state.ref_params is None  # the reference is the base: no copy of the model
    adapter_bytes = _leaf_bytes(state.params)
    assert _leaf_bytes(state.opt_state) <= 2 * adapter_bytes + 64  # Adam's moments are the adapters'
    assert 0 < adapter_bytes < _leaf_bytes(params) / 2
    assert state_sh.base.params["embed"].spec == models.model_param_shardings(mesh, CONFIG)["embed"].spec

    def first_of_each_group(batch, reward_params):
        n = batch["completion_mask"].shape[0]
        reward = (jnp.arange(n) % 4 == 0).astype(jnp.float32)
        return reward, {}

    step = make_grpo_step(
        grpo, CONFIG, optimizer, reward_fn=first_of_each_group, mesh=mesh, state_shardings=state_sh
    )
    prompts = np.tile(np.arange(3, 9, dtype=np.int32), (4, 1)) + np.arange(4)[:, None]
    rollout = sampling.generate(
        CONFIG,
        params,
        prompts,
        np.ones_like(prompts),
        jax.random.key(1),
        num_samples=4,
        max_new_tokens=5,
        eos_id=1,
    )
    batch = sharding.shard_batch(jax.device_get(rollout_to_batch(rollout, {}, 4)), mesh)
    base_before = jax.device_get(state.base.params)
    adapters_before = jax.device_get(state.params)
    state, first = step(state, batch)
    state, second = step(state, batch)
    # Update 0's forward is the base's own (fresh adapters change nothing): zero KL (up to the rounding
    # of two differently fused programs), the sampler's logprobs.
    assert float(first["kl"]) < 1e-12 and float(first["sampler_logprob_diff"]) < 1e-5
    assert float(second["kl"]) > 1e-8  # the adapters moved the policy away from the base
    for new, old in zip(
        jax.tree_util.tree_leaves(jax.device_get(state.base.params)), jax.tree_util.tree_leaves(base_before)
    ):
        np.testing.assert_array_equal(new, old)  # the base: bit for bit untouched
    moved = jax.tree_util.tree_map(
        lambda a, b: not np.array_equal(a, b), jax.device_get(state.params), adapters_before
    )
    assert all(jax.tree_util.tree_leaves(moved)), moved  # every A and B (A once B is non-zero)
    # The policy forward is the base plus adapters; the reference forward the base alone.
    assert not np.allclose(_logits(policy_params(state)), _logits(params), atol=1e-6)
    np.testing.assert_array_equal(_logits(reference_params(state)), _logits(params))


def test_a_bfloat16_base_and_iterative_grpo_reference_adapters():
    """`base_dtype` stores the base in bfloat16; with a reference of its own (iterative GRPO) the
    reference is adapters, reset to the policy's without copying the model."""
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2))
    _, state, _ = _lora_state(optimizer, mesh, base_dtype="bfloat16", with_reference=True)
    assert {x.dtype for x in jax.tree_util.tree_leaves(state.base.params)} == {jnp.dtype(jnp.bfloat16)}
    assert jax.tree_util.tree_structure(state.ref_params) == jax.tree_util.tree_structure(state.params)
    np.testing.assert_array_equal(_logits(reference_params(state)), _logits(state.base.params))
    state = state.replace(params=_trained_adapters())
    state = reset_reference(state)
    np.testing.assert_array_equal(_logits(reference_params(state)), _logits(policy_params(state)))


# ------------------------------------------------------------------------------------------------
# PEFT
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf():
    return types.SimpleNamespace(
        torch=pytest.importorskip("torch"),
        transformers=pytest.importorskip("transformers"),
        peft=pytest.importorskip("peft"),
    )


def test_a_peft_adapter_round_trips_through_peft_with_equal_logits(tmp_path, hf):
    """Our exported adapter, loaded by `peft` onto the transformers model of the base, gives our logits;
    `load_peft_adapter` reads it back exactly."""
    torch = hf.torch
    config = tiny_model_config(vocab_size=64, qkv_bias=True, architecture="qwen2", tie_embeddings=False)
    base = tiny_params(config, seed=2)
    base = dict(base, layers={**base["layers"], "q_bias": base["layers"]["q_bias"] + 0.1})
    models.save_pretrained(config, base, str(tmp_path / "base"))
    lora = LoRAConfig(rank=3, alpha=6.0, targets=("q", "v", "o", "gate", "down"))
    adapters = _trained_adapters(lora, config=config)
    lora_lib.save_peft_adapter(lora, adapters, str(tmp_path / "adapter"), base_model=str(tmp_path / "base"))

    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 3 and saved["lora_alpha"] == 6.0
    assert sorted(saved["target_modules"]) == ["down_proj", "gate_proj", "o_proj", "q_proj", "v_proj"]
    model = hf.transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    model = hf.peft.PeftModel.from_pretrained(model, str(tmp_path / "adapter")).eval()
    tokens = np.asarray(TOKENS) % config.vocab_size
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(models.forward(config, attach(FrozenBase(base, lora.scale), adapters), tokens))
    without = np.asarray(models.forward(config, base, tokens))
    assert np.abs(ours - without).max() > 1e-3  # the adapters matter
    np.testing.assert_allclose(theirs, ours, atol=2e-4, rtol=1e-4)

    read, loaded = lora_lib.load_peft_adapter(str(tmp_path / "adapter"), config)
    assert read == lora
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(adapters)):
        np.testing.assert_array_equal(a, np.asarray(b))

    # load_pretrained merges the adapter into the base: given both, or the adapter directory alone (its
    # base_model_name_or_path); plain params either way, with peft's logits.
    for args, kwargs in [
        ((tmp_path / "base",), {"adapter": str(tmp_path / "adapter")}),
        ((tmp_path / "adapter",), {}),
    ]:
        loaded_config, merged = models.load_pretrained(*map(str, args), **kwargs)
        assert loaded_config == config and "lora" not in merged["layers"]
        np.testing.assert_allclose(
            np.asarray(models.forward(config, merged, tokens)), theirs, atol=2e-4, rtol=1e-4
        )
    saved["base_model_name_or_path"] = None
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.raises(FileNotFoundError, match="base_model_name_or_path=None") as error:
        models.load_pretrained(str(tmp_path / "adapter"))
    assert "\n" not in str(error.value)


def test_unsupported_peft_adapters_fail_in_one_line(tmp_path):
    lora_lib.save_peft_adapter(LORA, _trained_adapters(), str(tmp_path))
    config_file = tmp_path / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    for field, value, message in [
        ("use_dora", True, "use_dora"),
        ("target_modules", ["q_proj", "lm_head"], "target_modules"),
        ("bias", "all", "bias"),
    ]:
        config_file.write_text(json.dumps(dict(saved, **{field: value})))
        with pytest.raises(ValueError, match=message) as error:
            lora_lib.load_peft_adapter(str(tmp_path), CONFIG)
        assert "\n" not in str(error.value)
    config_file.write_text(json.dumps(dict(saved, r=8)))
    with pytest.raises(ValueError, match="has shape"):
        lora_lib.load_peft_adapter(str(tmp_path), CONFIG)


@pytest.mark.parametrize("sampler_weights", lora_lib.SAMPLER_WEIGHTS)
def test_the_sampler_decodes_the_same_tokens_on_merged_weights_or_on_the_adapters(sampler_weights):
    """`config.lora.sampler_weights`: "merged" decodes W + (α/r)·B·A made once (`Merger`, in the compute
    dtype), "adapters" the base plus x·A·B at every token; both sample the policy the update trains."""
    base = tiny_params(CONFIG)
    adapters = _trained_adapters()
    frozen = FrozenBase(base, LORA.scale)
    params = (
        attach(frozen, adapters) if sampler_weights == "adapters" else lora_lib.Merger()(frozen, adapters)
    )
    prompts = np.tile(np.arange(3, 9, dtype=np.int32), (2, 1)) + np.arange(2)[:, None]

    def sample(p):
        return sampling.generate(
            CONFIG,
            p,
            prompts,
            np.ones_like(prompts),
            jax.random.key(7),
            num_samples=2,
            max_new_tokens=6,
            eos_id=1,
        )

    ours, by_hand, without = sample(params), sample(_merged_by_hand(base, adapters, LORA.scale)), sample(base)
    np.testing.assert_array_equal(ours.tokens, by_hand.tokens)
    np.testing.assert_allclose(ours.logprobs, by_hand.logprobs, atol=1e-4)
    assert not np.allclose(ours.logprobs, without.logprobs, atol=1e-3)  # the adapters are in the sample
