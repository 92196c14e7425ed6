"""Partial rollouts (grpo_jax.rollout.partial, issue 20): an unlimited budget is the one-shot engine; a
budget below the lengths completes groups across calls, whole, with each carried sample's tokens those
of one uninterrupted call and no page leaked; the same on a 2x2x2 mesh; the update's ratio is taken
against the recomputed proximal policy and weighted by min(π_prox/π_behaviour, C) (fails with the switch
off); the config is refused in one line where partial rollouts make no sense; and a run killed with
SIGKILL mid-way through partially rolled-out steps reruns to the uninterrupted run's metrics."""

import importlib.util
import json
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_grpo_step import _setup, first_of_each_group
from test_rollout_engine import EOS, LENGTH, PAGE, STOPS, _assert_same_rollout, _prompts

from grpo_jax import models, sampling, sharding
from grpo_jax.algorithms import GRPOConfig
from grpo_jax.rollout import partial
from grpo_jax.testing import mesh_2x2x2, tiny_model_config, tiny_params
from grpo_jax.training import setup
from grpo_jax.training.stages import STAGE_KINDS

CONFIG = tiny_model_config()
G = 4
SAMPLING = dict(num_samples=G, temperature=1.0, max_new_tokens=LENGTH, eos_id=EOS, stop_ids=STOPS)
PAYLOAD = {"example_index": jax.ShapeDtypeStruct((), jnp.int32)}


@pytest.fixture(scope="module")
def params():
    return tiny_params(CONFIG, seed=3)


@pytest.fixture(scope="module")
def references(params):
    """The static sampler's rollout of the test prompts for the two enqueue keys used below."""
    tokens, mask = _prompts()
    return {
        seed: sampling.generate(CONFIG, params, tokens, mask, jax.random.key(seed), **SAMPLING)
        for seed in (5, 6)
    }


def _rollouts(mesh=None, **kw):
    settings = dict(
        prompts_per_step=4,
        max_groups=4,
        num_slots=5,
        budget=3,
        page_size=PAGE,
        prompt_len=6,
        payload_shapes=PAYLOAD,
        check_pages=True,
        mesh=mesh,
        **SAMPLING,
    )
    return partial.PartialRollouts(CONFIG, **{**settings, **kw})


def _enqueue(rollouts, st, params, seed, first_example, mesh=None):
    tokens, mask = _prompts()
    prompts = {
        "prompt_tokens": tokens,
        "prompt_mask": mask,
        "example_index": np.arange(first_example, first_example + 4, dtype=np.int32),
    }
    if mesh is not None:
        prompts = sharding.shard_batch(prompts, mesh)
    return rollouts.enqueue(st, params, prompts, jax.random.key(seed), 0)


def _drain(rollouts, st, params, calls=40, shards=1):
    """Step (policy version = call number) until no group is left; -> {example: (call, its G rows)}."""
    groups, stats = {}, []
    for call in range(1, calls + 1):
        st, out = rollouts.step(st, params, call)
        host = jax.tree_util.tree_map(np.asarray, jax.device_get(out))
        stats.append({k: int(v) for k, v in host.stats.items()})
        for shard in np.split(np.arange(len(host.fill)), shards):  # each data shard hands out its own
            handed = host.payload["example_index"][shard][~host.fill[shard]]
            assert (np.diff(handed) > 0).all(), "complete groups are handed out oldest (enqueued) first"
        for b, fill in enumerate(host.fill):
            rows = slice(b * G, (b + 1) * G)
            if fill:
                assert not host.rollout.mask[rows].any(), "a fill place holds tokens"
                continue
            example = int(host.payload["example_index"][b])
            assert example not in groups, f"group {example} handed out twice"
            rollout = host.rollout.replace(
                **{
                    k: getattr(host.rollout, k)[rows]
                    for k in ("tokens", "logprobs", "sampling_logprobs", "mask", "lengths", "truncated")
                }
            )
            groups[example] = (call, types.SimpleNamespace(rollout=rollout, version=host.version[rows]))
        if stats[-1]["inflight_groups"] == 0:
            return st, groups, stats
    raise AssertionError(f"groups left after {calls} calls: {stats[-1]}")


def _assert_rows_equal(rows, ref, example):
    """A handed-out group's rows are its prompt's rows of the one-shot reference (prompt example % 4)."""
    at = slice((example % 4) * G, (example % 4 + 1) * G)
    for name in ("tokens", "mask", "lengths", "truncated"):
        np.testing.assert_array_equal(getattr(rows.rollout, name), np.asarray(getattr(ref, name))[at])
    np.testing.assert_allclose(rows.rollout.logprobs, np.asarray(ref.logprobs)[at], atol=1e-5)


def test_an_unlimited_budget_is_the_one_shot_engine(params, references):
    rollouts = _rollouts(budget=10**6)
    st = _enqueue(rollouts, rollouts.init(), params, 5, 0)
    st, out = rollouts.step(st, params, 0)
    _assert_same_rollout(out.rollout, references[5])
    assert not np.asarray(out.fill).any() and not np.asarray(out.version).any()
    stats = {k: int(v) for k, v in out.stats.items()}
    assert stats["page_errors"] == stats["pool_underflows"] == stats["pages_in_use"] == 0
    assert stats["inflight_groups"] == 0 and rollouts.room(st) == 4


def test_a_small_budget_completes_groups_across_calls_whole_and_unchanged(params, references):
    """8 groups (the 4 prompts under two keys) in an engine of 8 entries, 5 slots, 3 iterations a call:
    every group is handed out once, whole, with the rows one uninterrupted call draws (the params do not
    change); samples span calls (tokens from several policy versions); no page leaks."""
    rollouts = _rollouts(max_groups=8)
    st = rollouts.init()
    for seed, first in ((5, 0), (6, 4)):
        assert rollouts.room(st) >= 4
        st = _enqueue(rollouts, st, params, seed, first)
    assert rollouts.room(st) == 0
    st, groups, stats = _drain(rollouts, st, params)
    assert sorted(groups) == list(range(8))
    for example, (_, rows) in groups.items():
        _assert_rows_equal(rows, references[5 if example < 4 else 6], example)
    assert all(s["decode_iterations"] <= 3 for s in stats)
    assert all(s["page_errors"] == 0 and s["pool_underflows"] == 0 for s in stats)
    assert stats[-1]["pages_in_use"] == 0 and rollouts.room(st) == 8
    # Groups complete in different calls; a long group's samples were drawn over several calls, each token
    # tagged with the version of the forward that made its logits (never later than the call that took it).
    assert len({call for call, _ in groups.values()}) > 2
    spans = 0
    for call, rows in groups.values():
        valid = rows.rollout.mask > 0
        version = np.where(valid, rows.version, 0)
        assert version.max() <= call and (np.diff(version, axis=1)[valid[:, 1:]] >= 0).all()
        spans += len(np.unique(rows.version[valid])) > 1
    assert spans >= 2


def test_on_a_2x2x2_mesh_each_data_shard_carries_its_own_groups(params, references):
    """4 data shards, one prompt each per batch: the same groups as one device, each place's rows from
    its own shard."""
    mesh = mesh_2x2x2()
    sharded_params = jax.device_put(params, models.model_param_shardings(mesh, CONFIG))
    rollouts = _rollouts(mesh=mesh, num_slots=8, max_groups=8)
    st = _enqueue(rollouts, rollouts.init(), sharded_params, 5, 0, mesh)
    st = _enqueue(rollouts, st, sharded_params, 6, 4, mesh)
    assert st.pages["k"].sharding.spec[0] == sharding.BATCH_AXES
    st, groups, stats = _drain(rollouts, st, sharded_params, shards=4)
    assert sorted(groups) == list(range(8))
    for example, (_, rows) in groups.items():
        _assert_rows_equal(rows, references[5 if example < 4 else 6], example)
    assert all(s["page_errors"] == 0 for s in stats) and stats[-1]["pages_in_use"] == 0


def test_the_update_takes_its_ratio_against_the_proximal_policy_with_truncated_is(params):
    """Stale behaviour logprobs (π_b = π_θ · e^{±0.5} per token): with partial rollouts' setting
    (is_correction="token_tis": π_prox recomputed) the ratio is 1 and each token weighs min(π_prox/π_b, 2);
    with the switch off (π_old = the behaviour logprobs) the same batch is clipped. Staleness is logged
    over the valid tokens of non-fill rows."""
    on = GRPOConfig(num_generations=4, kl_coef=0.0, is_correction="token_tis", is_cap=1.5)
    off = GRPOConfig(num_generations=4, kl_coef=0.0, old_logprobs_source="sampler")
    metrics = {}
    for name, grpo in (("on", on), ("off", off)):
        state, step, batch, _ = _setup(grpo, reward_fn=first_of_each_group, with_reference=False)
        shift = np.where(np.arange(batch["old_logprobs"].shape[1]) % 2 == 0, -0.5, 0.5).astype(np.float32)
        for key in ("old_logprobs", "sampling_logprobs"):
            batch[key] = batch[key] + shift
        mask = np.asarray(batch["completion_mask"])
        batch["behaviour_version"] = -jnp.asarray(np.arange(mask.shape[1]) % 3, jnp.int32)[None].repeat(16, 0)
        batch["fill"] = jnp.asarray(np.arange(16) >= 12)
        expected_weight = np.minimum(np.exp(-shift), 1.5)[None].repeat(16, 0)
        metrics[name] = jax.device_get(step(state, batch)[1])
    assert metrics["on"]["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["on"]["clip_frac"] == 0 and metrics["on"]["old_logprobs_from_trainer"] == 1
    counted = (mask > 0) & (np.arange(16) < 12)[:, None]  # fill rows weigh 0
    assert metrics["on"]["is_weight_mean"] == pytest.approx(expected_weight[counted].mean(), abs=2e-3)
    assert metrics["off"]["clip_frac"] > 0.2 and metrics["off"]["ratio_max"] > 1.5
    lag = (np.arange(mask.shape[1]) % 3)[None].repeat(16, 0)
    assert metrics["on"]["staleness/mean"] == pytest.approx(lag[counted].mean(), abs=1e-6)
    assert metrics["on"]["staleness/max"] == 2


def test_the_benchmark_runs_at_a_tiny_size(capsys):
    """benchmarks/partial_rollouts.py: its JSON line has both systems' step times and group rates; the
    whole system hands out every group every step, the partial one hands out carried groups too."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "partial_rollouts.py"
    spec = importlib.util.spec_from_file_location("partial_rollouts_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tiny = "--prompts=2 --num_samples=2 --prompt_len=5 --max_new_tokens=16 --mean_len=6 --page_size=4"
    model = "--hidden_size=16 --num_layers=1 --num_heads=2 --num_kv_heads=1 --intermediate_size=32"
    report = module.main(
        [*tiny.split(), *model.split(), "--vocab_size=32", "--warmup=2", "--steps=3", "--no_write"]
    )
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name in ("whole", "partial"):
        for key in ("median_step_s", "groups_per_s", "fill_share", "staleness_mean", "step_time_vs_whole"):
            assert key in line[name], (name, key)
    assert line["whole"]["groups_per_step"] == 2 and line["whole"]["staleness_max"] == 0
    assert report["workload"]["budget"] == 4 and report["workload"]["max_inflight_groups"] == 8
    assert line["partial"]["decode_iterations_per_step"] <= 4
    assert "| partial |" in module.render(report)


# ------------------------------------------------------------------------------------------------
# Configuration: one line where partial rollouts make no sense
# ------------------------------------------------------------------------------------------------


def _config(**engine):
    path = Path(__file__).resolve().parents[1] / "configs" / "quickstart.py"
    spec = importlib.util.spec_from_file_location("configs_quickstart_partial", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("runlocal")
    c.sampler = "engine"
    c.engine.update(rollout_token_budget=4, **engine)
    c.grpo.algo.update(dynamic_sampling_refill=False, is_correction="token_tis")
    return c


def test_the_config_is_checked_in_one_line():
    grpo = STAGE_KINDS["grpo"]
    grpo.validate(_config(), "grpo")  # the partial-rollout setting itself is fine
    assert setup.max_inflight_groups(_config(), 2) == 8
    cases = [
        (dict(sampler="static"), "needs config.sampler='engine'"),
        (dict(engine={"rollout_token_budget": -1}), "rollout_token_budget must be an int >= 0"),
        (dict(engine={"max_inflight_groups": 3}), "max_inflight_groups=3 must be a multiple of"),
        (dict(algo={"is_correction": "none"}), "needs config.grpo.algo.is_correction='token_tis'"),
        (dict(algo={"dynamic_sampling_refill": True}), "dynamic_sampling_refill=False"),
    ]
    for change, message in cases:
        c = _config()
        c.sampler = change.get("sampler", c.sampler)
        c.engine.update(change.get("engine", {}))
        c.grpo.algo.update(change.get("algo", {}))
        with pytest.raises(ValueError, match=message) as error:
            setup.sampler_fn(c)
            grpo.validate(c, "grpo")
        assert "\n" not in str(error.value)
    c = _config()
    c.ppo = ml_collections.ConfigDict(dict(c.grpo.to_dict()))
    with pytest.raises(ValueError, match="partial rollouts train only 'grpo' stages.*'ppo'"):
        STAGE_KINDS["ppo"].validate(c, "ppo")


# ------------------------------------------------------------------------------------------------
# SIGKILL in the middle of partially rolled-out steps, rerun
# ------------------------------------------------------------------------------------------------

# quickstart:runlocal (SFT global steps 1-2, GRPO 3-6, a checkpoint after every step) with partial
# rollouts: 4 decode iterations a step for completions of up to 12 tokens, so samples stay in flight
# across steps and their groups complete steps later.
PARTIAL_RUN = (
    "--config.sampler=engine",
    "--config.engine.rollout_token_budget=4",
    "--config.grpo.algo.dynamic_sampling_refill=False",
    "--config.grpo.algo.is_correction=token_tis",
    "--config.grpo.steps=4",
    "--config.checkpoint.keep_last=3",
    # rewards that vary between completions of an untrained model: advantages and updates are non-zero
    '--config.grpo.rewards=(("format", 0.2), ("accuracy", 1.0), ("length_penalty", 1.0, {"max_len": 12}))',
)


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    from shared_runs import compilation_cache

    return compilation_cache(tmp_path_factory)


@pytest.mark.slow
def test_killed_mid_run_the_rerun_reproduces_the_partial_rollout_run(tmp_path, xla_cache):
    """SIGKILL right after GRPO's third step (global 5): the newest checkpoint (global 4) holds samples in
    flight (slots, pages, queue in TrainState.aux["rollout"]); the rerun resumes there and every metrics
    line equals the uninterrupted run's, the partial-rollout counters and staleness included."""
    from test_resume import _complete_lines, assert_reproduces, run_and_kill
    from test_train_script import assert_ok, checkpoint_steps, metric_lines, train

    from grpo_jax.checkpointing import Checkpointer, checkpoint_directory

    reference = tmp_path / "reference"
    assert_ok(train(reference, *PARTIAL_RUN, cache=xla_cache))
    grpo = {x["step"]: x for x in metric_lines(reference) if x["stage"] == "grpo"}
    assert grpo[4]["partial/live_samples"] > 0  # checkpoint 4 carries unfinished samples
    assert grpo[4]["partial/fill_groups"] > 0 and any(x["partial/complete_groups"] for x in grpo.values())
    assert max(x["staleness/max"] for x in grpo.values()) > 0  # some trained tokens came from older policies

    workdir = tmp_path / "run"

    def ready():
        lines = _complete_lines(workdir)
        return 4 in checkpoint_steps(workdir) and any(x["stage"] == "grpo" and x["step"] == 5 for x in lines)

    run_and_kill(
        workdir, tmp_path / "killed.log", xla_cache, ready, overrides=PARTIAL_RUN, HANG_AFTER="grpo:5"
    )
    with Checkpointer(checkpoint_directory(workdir), read_only=True) as checkpointer:
        leaves = checkpointer.read_meta(4)["leaves"]
    assert {"aux/rollout/pages/k", "aux/rollout/item", "aux/rollout/queue"} <= set(leaves)
    result = train(workdir, *PARTIAL_RUN, cache=xla_cache)
    assert_ok(result)
    assert "at stage grpo step 2" in result.stderr
    assert_reproduces(workdir, reference)
