"""The frontier GRPO switches, each with hand-computed numbers and a test that fails when the switch is off:
mask_truncated (DAPO §3.4), CISPO (arXiv 2506.13585), the entropy mask (arXiv 2506.01939), sampler/trainer
mismatch correction (truncated IS, IcePop), and every GRPOConfig field overridable from the command line
in every shipped config (typed placeholders for the Optional ones; max_grad_norm removed)."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from grpo_jax import models, sampling, sharding
from grpo_jax.algorithms import GRPOConfig, policy_loss
from grpo_jax.algorithms.grpo import importance_weights, masked_quantile
from grpo_jax.testing import tiny_model_config, tiny_params
from grpo_jax.training import (
    OptimizerConfig,
    create_train_state,
    grpo_loss,
    make_grpo_step,
    make_optimizer,
    rollout_to_batch,
)
from grpo_jax.training.grpo_step import sample_weights

LOG = math.log
BASE = {"clip_eps_low": 0.2, "clip_eps_high": 0.28, "kl_coef": 0.0, "loss_agg": "seq_mean_token_mean"}


def _f32(x):
    return None if x is None else jnp.asarray(x, jnp.float32)


def _loss(lp, old, adv, mask, ref=None, **kw):
    kw = BASE | kw
    for key in ("entropy", "sampler_logprobs", "sample_weight"):
        if key in kw:
            kw[key] = _f32(kw[key])
    return policy_loss(_f32(lp), _f32(old), _f32(ref), _f32(adv), _f32(mask), **kw)


def _grad(lp, old, adv, mask, **kw):
    return np.asarray(jax.grad(lambda x: _loss(x, old, adv, mask, **kw)[0])(_f32(lp)))


# ---------------------------------------------------------------- 1. mask_truncated (DAPO §3.4)


def test_mask_truncated_zeroes_truncated_rows():
    zero_variance = jnp.asarray([False, False, True, True])
    truncated = jnp.asarray([False, True, False, True])
    grpo = GRPOConfig(num_generations=2, mask_truncated=True, dynamic_sampling=True)
    weight, masked = sample_weights(grpo, zero_variance, truncated)
    np.testing.assert_array_equal(weight, [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(masked, [False, True, False, True])
    # The loss: row 0 (Â = 1, ratio 1, 2 tokens) counts, row 1 (Â = −2, truncated) does not.
    lp = [[0.0, 0.0], [0.0, 0.0]]
    loss, m = _loss(lp, lp, [1.0, -2.0], [[1, 1], [1, 1]], sample_weight=weight[:2])
    np.testing.assert_allclose(loss, -1.0, rtol=1e-6)  # without the mask: −(1 + (−2)) / 2 = 0.5
    np.testing.assert_allclose(
        _grad(lp, lp, [1.0, -2.0], [[1, 1], [1, 1]], sample_weight=weight[:2]),
        [
            [-0.5, -0.5],
            [0.0, 0.0],
        ],
    )


def test_mask_truncated_off_keeps_truncated_rows():
    grpo = GRPOConfig(num_generations=2)
    weight, masked = sample_weights(grpo, jnp.zeros(2, bool), jnp.asarray([False, True]))
    np.testing.assert_array_equal(weight, [1.0, 1.0])
    assert not np.asarray(masked).any()


# ---------------------------------------------------------------- 2. CISPO (MiniMax-M1 §3.1)


def test_cispo_keeps_gradient_of_clipped_tokens():
    # r = 1.5 > 1.28, Â = 1: GRPO's clip drops the token's gradient; CISPO's weight sg(1.28) keeps it.
    args = ([[LOG(1.5)]], [[0.0]], [1.0], [[1.0]])
    loss, m = _loss(*args, loss_type="cispo")
    np.testing.assert_allclose(loss, -1.28 * LOG(1.5), rtol=1e-6)  # −sg(clip(r)) · Â · log π
    np.testing.assert_allclose(_grad(*args, loss_type="cispo"), [[-1.28]], rtol=1e-6)
    assert _grad(*args)[0, 0] == 0.0  # the GRPO loss: no gradient
    assert m["clip_frac"] == 1.0 and m["clip_frac_high"] == 1.0


def test_cispo_exact_numbers_two_sequences():
    # ratios 0.5, 1.1 | 2.0 (clipped to 0.8, 1.1 | 1.28); Â = [−1, 2]; seq_mean_token_mean.
    lp = np.log([[0.25, 0.55], [0.6, 1.0]])
    old = np.log([[0.5, 0.5], [0.3, 1.0]])
    mask = [[1, 1], [1, 0]]
    adv = [-1.0, 2.0]
    loss, m = _loss(lp, old, adv, mask, loss_type="cispo")
    seq0 = -(0.8 * -1 * lp[0, 0] + 1.1 * -1 * lp[0, 1]) / 2
    seq1 = -(1.28 * 2 * lp[1, 0])
    np.testing.assert_allclose(loss, (seq0 + seq1) / 2, rtol=1e-5)
    np.testing.assert_allclose(
        _grad(lp, old, adv, mask, loss_type="cispo"), [[0.8 / 4, 1.1 / 4], [-1.28, 0.0]], rtol=1e-5
    )
    np.testing.assert_allclose(m["clip_frac"], 2 / 3, rtol=1e-6)  # 0.5 below, 2.0 above, whatever Â


def test_cispo_rejects_sequence_ratio_and_dual_clip():
    with pytest.raises(ValueError, match="cispo"):
        GRPOConfig(loss_type="cispo", dual_clip_c=3.0)
    with pytest.raises(ValueError, match="cispo"):
        _loss([[0.0]], [[0.0]], [1.0], [[1.0]], loss_type="cispo", ratio_level="sequence")


# ---------------------------------------------------------------- 3. entropy mask (arXiv 2506.01939)


def test_masked_quantile_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5)).astype(np.float32)
    valid = rng.random((3, 5)) > 0.4
    qs = jnp.asarray([0.0, 0.01, 0.2, 0.5, 0.8, 0.99, 1.0])
    got = jax.jit(masked_quantile)(jnp.asarray(x), jnp.asarray(valid), qs)
    np.testing.assert_allclose(got, np.quantile(x[valid], np.asarray(qs)), rtol=1e-5, atol=1e-6)
    assert float(masked_quantile(jnp.asarray(x), jnp.zeros((3, 5), bool), 0.5)) == 0.0


def test_entropy_mask_top_trains_only_high_entropy_tokens():
    # One sequence of 4 tokens, ratio 1, Â = 1, entropies 0.1 0.4 0.3 0.2; padding entropy 9 is ignored.
    lp = [[-1.0, -1.0, -1.0, -1.0, 0.0]]
    ref = [[-1.5, -1.0, -0.5, -1.0, 0.0]]
    ent = [[0.1, 0.4, 0.3, 0.2, 9.0]]
    mask = [[1, 1, 1, 1, 0]]
    kw = dict(kl_coef=0.1, entropy=ent, entropy_mask_top=0.5)
    loss, m = _loss(lp, lp, [1.0], mask, ref=ref, **kw)
    threshold = np.quantile([0.1, 0.4, 0.3, 0.2], 0.5)  # 0.25: tokens 1 and 2 are the top half
    d = np.array([-0.5, 0.0, 0.5, 0.0])
    k3 = np.exp(d) - d - 1  # the KL stays on all 4 tokens
    np.testing.assert_allclose(loss, (-2.0 + 0.1 * k3.sum()) / 4, rtol=1e-5)
    np.testing.assert_allclose(m["entropy_threshold"], threshold, rtol=1e-6)
    np.testing.assert_allclose(m["entropy_mask_frac"], 0.5)
    np.testing.assert_allclose(m["pg_loss"], -0.5, rtol=1e-6)
    # Gradient of the surrogate only on tokens 1 and 2 (−1/4 each); the KL gradient β(1 − e^d)/4 on all.
    expected = 0.1 * (1 - np.exp(d)) / 4 - np.array([0.0, 0.25, 0.25, 0.0])
    np.testing.assert_allclose(_grad(lp, lp, [1.0], mask, ref=ref, **kw)[0, :4], expected, atol=1e-6)
    # Switch off: every token's surrogate counts.
    off, _ = _loss(lp, lp, [1.0], mask, ref=ref, kl_coef=0.1, entropy=ent)
    np.testing.assert_allclose(off, (-4.0 + 0.1 * k3.sum()) / 4, rtol=1e-5)


# ---------------------------------------------------------------- 4. sampler/trainer mismatch correction

OLD = np.log([[0.5, 1.0, 3.0]])  # π_old / π_sampler = 0.5, 1, 3 with log π_sampler = 0
SAMPLER = np.zeros((1, 3))


@pytest.mark.parametrize(
    "mode, kw, expected",
    [
        ("none", {}, [1.0, 1.0, 1.0]),
        ("token_tis", {"is_cap": 2.0}, [0.5, 1.0, 2.0]),
        ("seq_tis", {"is_cap": 2.0}, [1.5, 1.5, 1.5]),  # Π ρ = 1.5 < C
        ("seq_tis", {"is_cap": 1.2}, [1.2, 1.2, 1.2]),
        ("icepop", {"is_mask_low": 0.6, "is_mask_high": 2.0}, [0.0, 1.0, 0.0]),
        ("icepop", {"is_mask_low": 0.5, "is_mask_high": 3.0}, [0.5, 1.0, 3.0]),
    ],
)
def test_importance_weights_exact(mode, kw, expected):
    w = importance_weights(_f32(OLD), _f32(SAMPLER), jnp.ones((1, 3)), mode, **kw)
    np.testing.assert_allclose(w, [expected], rtol=1e-6)


def test_is_correction_token_tis_weights_policy_gradient():
    # ratio π_θ/π_old = 1 (θ = θ_old), Â = 1: the per-token loss is −w_t, its gradient −w_t / 3.
    kw = dict(sampler_logprobs=SAMPLER, is_correction="token_tis", is_cap=2.0)
    loss, m = _loss(OLD, OLD, [1.0], [[1, 1, 1]], **kw)
    np.testing.assert_allclose(loss, -(0.5 + 1.0 + 2.0) / 3, rtol=1e-6)  # "none" gives −1
    np.testing.assert_allclose(
        _grad(OLD, OLD, [1.0], [[1, 1, 1]], **kw), [[-0.5 / 3, -1 / 3, -2 / 3]], rtol=1e-6
    )
    np.testing.assert_allclose(m["is_weight_mean"], 3.5 / 3, rtol=1e-6)
    off, _ = _loss(OLD, OLD, [1.0], [[1, 1, 1]], sampler_logprobs=SAMPLER)
    np.testing.assert_allclose(off, -1.0, rtol=1e-6)


def test_is_correction_icepop_masks_out_of_bounds_tokens():
    kw = dict(sampler_logprobs=SAMPLER, is_correction="icepop", is_mask_low=0.6, is_mask_high=2.0)
    loss, m = _loss(OLD, OLD, [1.0], [[1, 1, 1]], **kw)
    np.testing.assert_allclose(loss, -1.0 / 3, rtol=1e-6)
    np.testing.assert_allclose(m["is_zero_frac"], 2 / 3, rtol=1e-6)


def test_is_correction_seq_tis_in_log_space():
    # 200 tokens of ρ = 2 each: Π ρ = 2^200 overflows float32; the log-space product caps it at C.
    old = np.full((1, 200), LOG(2.0))
    w = importance_weights(_f32(old), jnp.zeros((1, 200)), jnp.ones((1, 200)), "seq_tis", is_cap=3.0)
    np.testing.assert_allclose(w, 3.0, rtol=1e-6)


# ---------------------------------------------------------------- the step: routing and metrics

CONFIG = tiny_model_config(vocab_size=32)


def _rollout_batch(grpo, seed=0, max_new=4):
    tokens = np.tile(np.arange(3, 8, dtype=np.int32), (2, 1)) + np.arange(2)[:, None]
    rollout = sampling.generate(
        CONFIG,
        tiny_params(CONFIG, seed=seed),
        tokens,
        np.ones_like(tokens),
        jax.random.key(seed + 1),
        num_samples=grpo.num_generations,
        max_new_tokens=max_new,
        temperature=grpo.temperature,
        eos_id=1,
    )
    return rollout_to_batch(rollout, {}, grpo.num_generations)


def _reward(batch, params):
    n = batch["completion_mask"].shape[0]
    reward = (jnp.arange(n) % 2 == 0).astype(jnp.float32)
    return reward, {"r": reward}


def test_step_mask_truncated_and_is_correction_metrics():
    """One compile: μ = 2 (π_old precomputed in the step), mask_truncated, token TIS, entropy mask. The
    batch's sampling_logprobs are shifted by +0.1 on valid tokens, so log π_old − log π_sampler = −0.1."""
    grpo = GRPOConfig(
        num_generations=4,
        kl_coef=0.0,
        num_iterations=2,
        mask_truncated=True,
        is_correction="token_tis",
        entropy_mask_top=0.5,
    )
    batch = _rollout_batch(grpo)
    assert "sampling_logprobs" in batch  # rollout_to_batch carries the sampler's truncated logprobs
    valid = np.asarray(batch["completion_mask"]) > 0
    batch["sampling_logprobs"] = jnp.where(valid, batch["old_logprobs"] + 0.1, 0.0)
    truncated = np.array([True, False, False, False, True, True, False, False])  # 3 of 8 rows
    batch["truncated"] = jnp.asarray(truncated)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, max_grad_norm=1.0))
    shardings = models.model_param_shardings(mesh, CONFIG)
    params = jax.device_put(tiny_params(CONFIG, seed=0), shardings)
    state, state_sh = create_train_state(params, optimizer, mesh, shardings, rng=jax.random.key(0))
    step = make_grpo_step(grpo, CONFIG, optimizer, reward_fn=_reward, mesh=mesh, state_shardings=state_sh)
    _, m = step(state, batch)
    m = jax.tree_util.tree_map(float, jax.device_get(m))
    np.testing.assert_allclose(m["truncated_masked_frac"], truncated.mean())
    np.testing.assert_allclose(m["mismatch/abs_logp_diff_max"], 0.1, atol=1e-4)
    np.testing.assert_allclose(m["mismatch/abs_logp_diff_mean"], 0.1, atol=1e-4)
    for name in ("p01", "p50", "p99"):
        np.testing.assert_allclose(m[f"mismatch/ratio_{name}"], math.exp(-0.1), atol=1e-4)
    np.testing.assert_allclose(m["is_weight_mean"], math.exp(-0.1), atol=1e-4)
    assert 0.5 <= m["entropy_mask_frac"] <= 1.0 and m["entropy_threshold"] > 0


def test_grpo_loss_mu_one_takes_pi_old_from_its_own_forward():
    """μ = 1, one minibatch: π_old is the loss's own forward under stop-gradient, so the PPO ratio is
    exactly 1 while the sampler's logprobs (here 0.2 higher) only set the IS weight e^{−0.2}."""
    grpo = GRPOConfig(num_generations=4, kl_coef=0.0, is_correction="token_tis")
    batch = _rollout_batch(grpo)
    valid = batch["completion_mask"] > 0
    batch["old_logprobs"] = jnp.where(valid, batch["old_logprobs"] + 5.0, 0.0)  # ignored: not π_old
    batch["sampling_logprobs"] = jnp.where(valid, batch["sampling_logprobs"] + 0.2, 0.0)
    batch["advantages"] = jnp.ones(8, jnp.float32)
    batch["sample_weight"] = jnp.ones(8, jnp.float32)
    loss, m = grpo_loss(tiny_params(CONFIG, seed=0), batch, grpo=grpo, model_config=CONFIG)
    np.testing.assert_allclose(m["ratio_mean"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(m["is_weight_mean"], math.exp(-0.2), rtol=1e-4)
    np.testing.assert_allclose(loss, -math.exp(-0.2), rtol=1e-4)  # −w · r · Â, every token alike


# ---------------------------------------------------------------- 5. every field from the command line

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# Two valid targets: A sets every field but one (Optional ones to numbers); B the switches A cannot combine.
TARGET_A = dict(
    num_generations=6,
    kl_coef=0.5,
    clip_eps_low=0.1,
    clip_eps_high=0.3,
    num_iterations=3,
    num_minibatches=2,
    advantage_estimator="grpo",
    advantage_scale="batch",
    advantage_eps=1e-3,
    loss_agg="token_mean",
    kl_estimator="k1",
    kl_in_reward=True,
    ratio_level="sequence",
    dual_clip_c=3.0,
    entropy_coef=0.01,
    max_len_norm=64,
    dynamic_sampling=True,
    dynamic_sampling_refill=True,
    refill_oversample=2.0,
    refill_max_rounds=3,
    mask_truncated=True,
    loss_type="grpo",
    entropy_mask_top=0.2,
    is_correction="token_tis",
    is_cap=3.0,
    is_mask_low=0.4,
    is_mask_high=2.5,
    reference_reset_every=10,
    temperature=0.7,
    old_logprobs_source="trainer",
)
TARGET_B = dict(
    loss_type="cispo",
    advantage_estimator="reinforce_pp",
    reinforce_pp_whiten="token",
    is_correction="icepop",
    kl_in_reward=False,
)


def _grpo_stages(path):
    """(variant, stage name) of every GRPO-kind stage with an algo block in the config file."""
    text = path.read_text()
    out = []
    for variant in [None, "runlocal"] if "runlocal" in text else [None]:
        spec = f"{path}:{variant}" if variant else str(path)
        config = _parse(spec, [])
        for name in config.keys():
            section = config[name]
            if name.startswith("grpo") and hasattr(section, "keys") and "algo" in section:
                out.append((spec, name))
    return out


def _parse(spec, overrides):
    """The config as `scripts/train.py --config=spec *overrides` sees it (ml_collections config_flags)."""
    argv = ["prog", f"--config={spec}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", default=None, flag_values=values, sys_argv=argv)
    values(argv)
    return values.config


CASES = [
    pytest.param(spec, stage, id=f"{Path(spec.split(':')[0]).stem}{spec[len(spec.split(':')[0]) :]}-{stage}")
    for path in sorted(CONFIG_DIR.glob("*.py"))
    for spec, stage in _grpo_stages(path)
]


def test_configs_with_grpo_stages_are_found():
    assert {Path(p.values[0].split(":")[0]).stem for p in CASES} >= {
        "quickstart",
        "r1_pipeline",
        "gsm8k_qwen2_5",
    }


@pytest.mark.parametrize("spec, stage", CASES)
def test_every_grpo_config_field_overridable_from_command_line(spec, stage):
    fields = set(GRPOConfig.__dataclass_fields__)
    algo = _parse(spec, [])[stage].algo
    assert set(algo.keys()) == fields, set(algo.keys()) ^ fields  # the algo block holds every field
    GRPOConfig.from_dict(algo)  # unset placeholders read back as None
    for target in (TARGET_A, TARGET_B):
        flags_ = [f"--config.{stage}.algo.{k}={v}" for k, v in target.items()]
        parsed = GRPOConfig.from_dict(_parse(spec, flags_)[stage].algo)
        for key, value in target.items():
            assert getattr(parsed, key) == value and type(getattr(parsed, key)) is type(value), key
    assert set(TARGET_A) | set(TARGET_B) == fields


def test_config_fields_emits_typed_placeholders():
    fields = GRPOConfig.config_fields()
    assert fields["dual_clip_c"].get() is None and fields["max_len_norm"].get() is None
    assert GRPOConfig.from_dict(fields) == GRPOConfig()
    assert GRPOConfig.config_fields(dual_clip_c=2.0)["dual_clip_c"] == 2.0


def test_max_grad_norm_removed_with_a_clear_error():
    assert "max_grad_norm" not in GRPOConfig.__dataclass_fields__
    with pytest.raises(ValueError, match="max_grad_norm was removed.*--config.grpo.max_grad_norm"):
        GRPOConfig.from_dict({"max_grad_norm": 1.0})
