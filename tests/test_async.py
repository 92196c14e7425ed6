"""Asynchronous GRPO (docs/ARCHITECTURE.md, "Asynchronous GRPO"): the sampler on its own mesh
(`config.sampler_mesh`) fed by a weight sync that gathers no whole weight on any chip, and pipelined
rollouts (`config.grpo.off_policy_steps`): with k = 0 a 4 + 4 split reproduces the co-located run on the
trainer's 4 devices exactly; with k = 1 the update of step s trains on the rollout the params of step
s − 1 sampled, with importance weights of exactly 1 when the params do not move; a resume samples the
in-flight rollout again from the same prompts and key. Runs train in this process, on conftest's 8 CPU
devices."""

from __future__ import annotations

import collections
import importlib.util
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from grpo_jax import models, sharding
from grpo_jax.rollout.weight_sync import WeightSync, tree_bytes
from grpo_jax.testing import tiny_model_config
from grpo_jax.training import setup, trainer
from grpo_jax.training.pipeline import InFlight, InflightDataIterator, check_lag
from grpo_jax.training.stages import STAGE_KINDS

REPO = Path(__file__).resolve().parents[1]

# A GRPO-only quickstart:runlocal: 8 prompts x G = 4 per step, a reward that varies between completions
# of an untrained model (non-zero advantages and updates), decoupled PPO, no eval, no refill rounds.
OVERRIDES = {
    "stages": ("grpo",),
    "tensorboard": False,
    "grpo.steps": 3,
    "grpo.prompts_per_step": 8,
    "grpo.eval_every": 0,
    "grpo.eval_at_end": False,
    "grpo.checkpoint_every": 100,
    "grpo.learning_rate": 1e-2,
    "grpo.rewards": (("format", 0.2), ("accuracy", 1.0), ("length_penalty", 1.0, {"max_len": 12})),
    "grpo.algo.dynamic_sampling_refill": False,
    "grpo.algo.is_correction": "token_tis",
}
# Below every non-zero weight's ulp: Adam's first steps move each weight by about the learning rate, so
# the params stay put (OptimizerConfig refuses a learning rate of exactly 0).
NO_LEARNING = 1e-30


def _quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", REPO / "configs" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(**changes) -> ml_collections.ConfigDict:
    c = _quickstart().get_config("runlocal")
    for key, value in {**OVERRIDES, **changes}.items():
        *path, last = key.split(".")
        node = c
        for part in path:
            node = node[part]
        node[last] = value
    return c


def _lines(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _flags(changes: dict) -> list[str]:
    """`changes` as scripts/train.py's `--config.KEY=VALUE` flags."""
    return [f"--config.{k}={v}" if isinstance(v, str) else f"--config.{k}={v!r}" for k, v in changes.items()]


def _train(workdir: Path, **changes) -> list[dict]:
    trainer.train(_config(**changes), str(workdir))
    return [x for x in _lines(workdir) if x["stage"] == "grpo"]


def _numbers(line: dict, drop=()) -> dict:
    """A metrics line without timings, compile counts, the sync's own keys and `drop`'s prefixes."""
    skip = ("sync/", "pipeline/", *drop)
    return {
        k: v
        for k, v in line.items()
        if not k.endswith("time_s") and k != "compiles" and not k.startswith(skip)
    }


# ------------------------------------------------------------------------------------------------
# Meshes and the weight sync
# ------------------------------------------------------------------------------------------------


def test_the_sampler_mesh_takes_the_last_devices_and_the_trainer_the_rest():
    devices = jax.devices()
    c = _config(sampler_mesh=(2, 2), mesh=(-1, 1, 1))
    trainer_mesh, sampler_mesh = setup.build_meshes(c)
    assert list(trainer_mesh.devices.flat) == devices[:4]
    assert list(sampler_mesh.devices.flat) == devices[4:]
    assert dict(sampler_mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2}  # replica = the batch axis
    assert setup.build_mesh(c) == trainer_mesh
    assert setup.build_meshes(_config())[1] is None  # absent: co-located, all 8 devices
    assert setup.build_meshes(_config())[0].devices.size == 8
    cases = [
        (dict(sampler_mesh=(4, 2)), r"takes 8 devices and leaves none of the 8"),
        (dict(sampler_mesh=(2, 2), mesh=(8, 1, 1)), r"config.mesh=\(8, 1, 1\) over the 4 devices"),
        (dict(sampler_mesh=(0, 2)), r"must be two positive ints"),
        (dict(sampler_mesh=(4,)), r"must be two positive ints"),
        (dict(sampler_mesh=(2, 2), dcn_mesh=(2, 1, 1)), r"multislice split is not built yet"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            setup.build_meshes(_config(**changes))
        assert "\n" not in str(error.value)


def test_weight_sync_casts_each_shard_in_place_and_lands_in_the_sampler_shardings():
    """The trainer's fsdp-split fp32 params -> bfloat16 on a 2 replica x 2 tensor sampler mesh: the cast
    keeps every input sharding and compiles without an all-gather; each sampler chip holds its tensor
    slice only; the previous version stays readable after the next push (double buffer)."""
    config = tiny_model_config()
    devices = jax.devices()
    trainer_mesh = sharding.make_mesh((1, 4, 1), devices[:4])
    sampler_mesh = sharding.make_sampler_mesh((2, 2), devices[4:])
    params = models.init_sharded_params(config, jax.random.key(0), trainer_mesh)
    assert params["embed"].sharding.spec[1] == "fsdp"  # the trainer's weights are split over fsdp

    sync = WeightSync(config, sampler_mesh, dtype="bfloat16")
    hlo = sync.cast_fn(params).lower(params).compile().as_text()
    assert "all-gather" not in hlo and "all-reduce" not in hlo
    cast = sync.cast_fn(params)(params)
    for before, after in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(cast)):
        assert after.sharding == before.sharding  # each chip casts its own shard

    first = sync.push(params, version=0, wait=True)
    expected = models.model_param_shardings(sampler_mesh, config)
    flat_expected = jax.tree_util.tree_leaves(expected, is_leaf=lambda x: hasattr(x, "spec"))
    for leaf, want, source in zip(
        jax.tree_util.tree_leaves(first.params), flat_expected, jax.tree_util.tree_leaves(params)
    ):
        assert leaf.dtype == jnp.bfloat16 and leaf.sharding == want
        assert {s.device for s in leaf.addressable_shards} <= set(devices[4:])
        # a slice per chip: the whole weight only where the rules leave it replicated (e.g. norms)
        assert {s.data.shape for s in leaf.addressable_shards} == {want.shard_shape(leaf.shape)}
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(source.astype(jnp.bfloat16)))
    assert first.params["embed"].addressable_shards[0].data.shape[0] == config.vocab_size // 2  # vocab/tensor
    assert first.bytes == tree_bytes(params) // 2 and first.time_s > 0

    second = sync.push(jax.tree_util.tree_map(lambda x: x * 2, params), version=1)
    jax.block_until_ready(second.params)
    assert not first.params["embed"].is_deleted()  # version 0 is still there for a rollout reading it
    np.testing.assert_array_equal(np.asarray(second.params["embed"]), np.asarray(first.params["embed"]) * 2)


def test_on_several_hosts_every_host_gives_the_sampler_its_last_devices():
    """Two hosts of 4 (fake) devices, a 2 x 2 sampler: each host keeps its first 2 for the trainer and gives
    its last 2 to the sampler, so every process holds devices of both meshes; one line when the sampler's
    devices do not split evenly over the hosts or leave a host none for the trainer."""
    from test_sharding import FakeHostDevice

    hosts = [FakeHostDevice(id=i, process_index=i // 4) for i in range(8)]
    trainer_devices, sampler_devices = sharding.split_devices(hosts, (2, 2))
    assert [d.id for d in trainer_devices] == [0, 1, 4, 5]
    assert [d.id for d in sampler_devices] == [2, 3, 6, 7]
    assert [d.id for d in sharding.split_devices(jax.devices(), (2, 2))[1]] == [4, 5, 6, 7]  # one host
    uneven = [FakeHostDevice(id=i, process_index=int(i >= 4)) for i in range(6)]  # hosts of 4 and 2
    for devices, shape in ((hosts, (3, 1)), (uneven, (2, 1))):
        with pytest.raises(ValueError, match="must split evenly over the 2 processes") as error:
            sharding.split_devices(devices, shape)
        assert "\n" not in str(error.value)


def test_the_mirror_moves_weights_between_meshes_as_device_put_does():
    """`move_to`'s several-process path, forced in one process: a `device_put` onto the sampler's layout
    mirrored on the trainer's own devices, then each slice copied chip to chip to its paired sampler
    device. Leaf by leaf it equals `jax.device_put` (shardings and values), replicated arrays included;
    each sampler device's source is the trainer device at its place in the mirror."""
    from grpo_jax.rollout.weight_sync import MIRROR_AXIS, mirror_mesh, move_to

    config = tiny_model_config()
    devices = jax.devices()
    trainer_mesh = sharding.make_mesh((1, 4, 1), devices[:4])
    sampler_mesh = sharding.make_sampler_mesh((2, 2), devices[4:])
    params = models.init_sharded_params(config, jax.random.key(0), trainer_mesh)
    params["scalar"] = jax.device_put(np.float32(3.0), sharding.replicated(trainer_mesh))
    targets = dict(
        models.model_param_shardings(sampler_mesh, config), scalar=sharding.replicated(sampler_mesh)
    )
    moved, direct = move_to(params, targets, via_mirror=True), jax.device_put(params, targets)
    for a, b in zip(jax.tree_util.tree_leaves(moved), jax.tree_util.tree_leaves(direct), strict=True):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mirror, pairs = mirror_mesh(devices[:4], sampler_mesh)
    assert dict(mirror.shape) == {MIRROR_AXIS: 1, "data": 2, "fsdp": 1, "tensor": 2}
    assert [pairs[d] for d in sampler_mesh.devices.flat] == devices[:4]
    with pytest.raises(ValueError, match="must be the same multiple of its sampler devices"):
        mirror_mesh(devices[:3], sampler_mesh)
    # twice the trainer's devices: two mirror copies, the first one's chips send
    small = sharding.make_sampler_mesh((1, 2), devices[6:])
    mirror, pairs = mirror_mesh(devices[:4], small)
    assert dict(mirror.shape)[MIRROR_AXIS] == 2 and [pairs[d] for d in small.devices.flat] == devices[:2]
    targets = models.model_param_shardings(small, config)
    tree = {k: v for k, v in params.items() if k != "scalar"}
    moved, direct = move_to(tree, targets, via_mirror=True), jax.device_put(tree, targets)
    for a, b in zip(jax.tree_util.tree_leaves(moved), jax.tree_util.tree_leaves(direct), strict=True):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_in_flight_batches_are_not_in_the_checkpointed_data_position():
    class Counter:
        def __init__(self):
            self.position = 0

        def __next__(self):
            self.position += 1
            return self.position

        def get_state(self):
            return {"position": self.position}

        def set_state(self, state):
            self.position = state["position"]

    inflight: collections.deque = collections.deque()
    data = InflightDataIterator(Counter(), inflight)
    for target in (0, 1, 2):
        state = data.snapshot()
        inflight.append(InFlight(target, 0, {"batch": next(data)}, None, state, 0.0))
    inflight.popleft()  # step 0 trained; the batches of steps 1 and 2 are in flight
    assert data.get_state() == {"position": 1}
    data.set_state(data.get_state())  # a resume drops them and takes them again
    assert not inflight and next(data) == 2
    assert check_lag(InFlight(5, 4, {}, None, None, 0.0), 5, 1) == 1
    with pytest.raises(RuntimeError, match="2 updates old, more than off_policy_steps=1"):
        check_lag(InFlight(5, 3, {}, None, None, 0.0), 5, 1)


def test_the_config_is_checked_in_one_line():
    grpo = STAGE_KINDS["grpo"]
    grpo.validate(_config(**{"grpo.off_policy_steps": 2}, sampler_mesh=(4, 1)), "grpo")
    cases = [
        ({"grpo.off_policy_steps": -1}, "off_policy_steps must be an int >= 0"),
        (
            {"grpo.off_policy_steps": 1, "grpo.algo.is_correction": "none"},
            "off_policy_steps=1 trains on rollouts of older params: set config.grpo.algo.is_correction",
        ),
        (
            {"grpo.off_policy_steps": 1, "grpo.algo.dynamic_sampling_refill": True},
            "dynamic_sampling_refill=False",
        ),
        ({"sampler_mesh": (3, 1)}, r"prompts_per_step=8 must be divisible by the sampler's replicas"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            grpo.validate(_config(**changes), "grpo")
        assert "\n" not in str(error.value)
    # π_old recomputed by the trainer without an IS weight: decoupled PPO's proximal ratio alone
    ok = _config(**{"grpo.off_policy_steps": 1, "grpo.algo.is_correction": "none"})
    ok.grpo.algo.old_logprobs_source = "trainer"
    grpo.validate(ok, "grpo")
    c = _config(**{"grpo.off_policy_steps": 1})
    c.ppo = ml_collections.ConfigDict(c.grpo.to_dict())
    with pytest.raises(ValueError, match="only 'grpo' stages pipeline their rollouts.*'ppo'"):
        STAGE_KINDS["ppo"].validate(c, "ppo")


# ------------------------------------------------------------------------------------------------
# Runs: k = 0 on a 4 + 4 split, k = 1, a resume with a rollout in flight
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def colocated_on_4(tmp_path_factory) -> list[dict]:
    """The co-located run (k = 0) on 4 devices, the trainer's share of the split below: a subprocess,
    since this process has 8."""
    from test_train_script import assert_ok, train

    workdir = tmp_path_factory.mktemp("colocated")
    assert_ok(train(workdir, *_flags(OVERRIDES), devices=4))
    return [x for x in _lines(workdir) if x["stage"] == "grpo"]


def test_a_4_plus_4_split_with_off_policy_steps_0_is_the_colocated_run(tmp_path, colocated_on_4):
    """Sampler on devices 4-7 (4 replicas), trainer on 0-3: every metric of every step equals the
    co-located run on 4 devices bit for bit; the split adds only the sync's own keys."""
    split = _train(tmp_path, sampler_mesh=(4, 1))
    assert len(split) == len(colocated_on_4) == 3
    for mine, theirs in zip(split, colocated_on_4):
        assert _numbers(mine) == _numbers(theirs)
        assert mine["sync/bytes"] > 0 and "sync/bytes" not in theirs
        assert "staleness/mean" not in mine  # on-policy: no version tags


@pytest.fixture(scope="module")
def one_step_off(tmp_path_factory) -> Path:
    """k = 1 on the 4 + 4 split with params that do not move, a checkpoint after every step."""
    workdir = tmp_path_factory.mktemp("one_step_off")
    _train(
        workdir,
        sampler_mesh=(4, 1),
        **{
            "grpo.off_policy_steps": 1,
            "grpo.learning_rate": NO_LEARNING,
            "grpo.checkpoint_every": 1,
            "checkpoint.keep_last": 3,
            "checkpoint.async_save": False,
        },
    )
    return workdir


def test_off_policy_steps_1_trains_step_s_on_the_rollout_of_step_s_minus_1(one_step_off):
    """Step 1 samples its own rollout (nothing was in flight: lag 0); every later update trains on the
    rollout dispatched one step earlier, under the params before the previous update (every token's
    `behaviour_version` = s − 1); with params that do not move, π_prox/π_behaviour is 1."""
    lines = [x for x in _lines(one_step_off) if x["stage"] == "grpo"]
    assert [x["pipeline/lag"] for x in lines] == [0.0, 1.0, 1.0]
    assert [x["staleness/mean"] for x in lines] == [0.0, 1.0, 1.0]
    assert [x["staleness/max"] for x in lines] == [0.0, 1.0, 1.0]
    assert [x["staleness/stale_token_frac"] for x in lines] == [0.0, 1.0, 1.0]
    for x in lines:
        assert x["is_weight_mean"] == pytest.approx(1.0, abs=1e-6)
        assert x["mismatch/abs_logp_diff_max"] < 1e-5  # the sampler's numbers, not a policy's lag
        assert x["sync/bytes"] > 0 and {"sample_time_s", "train_time_s", "sync_time_s"} <= set(x)
        assert x["pipeline/sampler_bound"] in (0.0, 1.0)


def test_a_resume_samples_the_inflight_rollout_again_from_the_same_prompts(one_step_off, tmp_path):
    """Checkpoint 1 was written with step 2's rollout in flight. Resumed there, the rollout is sampled
    again (lag 0 now) from the same prompt batch and key: with params that do not move it is the same
    rollout, so the line equals the uninterrupted one but for the lag; step 3 is one step off again."""
    resumed = tmp_path / "resumed"
    shutil.copytree(one_step_off, resumed)
    for step in (2, 3):
        shutil.rmtree(resumed / "checkpoints" / str(step))
    lines = _train(
        resumed,
        sampler_mesh=(4, 1),
        **{
            "grpo.off_policy_steps": 1,
            "grpo.learning_rate": NO_LEARNING,
            "grpo.checkpoint_every": 1,
            "checkpoint.keep_last": 3,
            "checkpoint.async_save": False,
        },
    )
    original = [x for x in _lines(one_step_off) if x["stage"] == "grpo"]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert [x["pipeline/lag"] for x in lines] == [0.0, 0.0, 1.0]
    staleness = ("staleness/", "is_weight", "mismatch/", "sampler_logprob_diff")
    for mine, theirs in zip(lines, original):
        assert _numbers(mine, drop=staleness) == _numbers(theirs, drop=staleness)


def test_co_located_off_policy_steps_2_lags_up_to_2_and_the_weights_see_it(tmp_path):
    """k = 2 without a sampler mesh (the rollouts read a copy of the params while the update donates the
    state): step 1 is on-policy, step 2 trains on a rollout of the start params (lag 1), step 3 too (lag
    2). The params move (learning rate 1e-2), so π_prox/π_behaviour departs from 1 exactly where the
    rollout is stale: the weights of the test above are 1 because the params stayed, not by construction."""
    lines = _train(tmp_path, **{"grpo.off_policy_steps": 2})
    assert [x["pipeline/lag"] for x in lines] == [0.0, 1.0, 2.0]
    assert [x["staleness/max"] for x in lines] == [0.0, 1.0, 2.0]
    assert lines[0]["mismatch/abs_logp_diff_max"] < 1e-5
    for x in lines[1:]:
        assert x["mismatch/abs_logp_diff_max"] > 1e-3
        assert x["is_weight_mean"] != pytest.approx(1.0, abs=1e-4)


# k = 1 on a 1 + 1 split (2 CPU devices) with params that move, a checkpoint after every step: the pipelined
# run that tests/test_resume.py's SIGKILL helpers kill and rerun.
KILLED_RUN = _flags(
    {
        **OVERRIDES,
        "sampler_mesh": (1, 1),
        "grpo.off_policy_steps": 1,
        "grpo.checkpoint_every": 1,
        "checkpoint.keep_last": 3,
    }
)


def _replayed(line: dict) -> dict:
    """What a rerun must reproduce: every number but timings and what is read off them (`_numbers`),
    with the pipeline's own counters."""
    return dict(_numbers(line), **{k: line[k] for k in ("pipeline/lag", "pipeline/inflight", "sync/bytes")})


@pytest.mark.slow
def test_a_pipelined_run_killed_with_a_rollout_in_flight_reruns_as_a_run_restarted_at_that_step(
    tmp_path, tmp_path_factory
):
    """SIGKILL right after step 2's line (checkpoint 1 written, step 2's own not yet; step 3's rollout in
    flight, dispatched under the params of step 1): the rerun resumes from checkpoint 1, samples step 2
    again under the restored params (lag 0; that these are step 2's prompts and key is checked in-process
    above), then pipelines step 3 (lag 1). The issue's definition of a resume: the in-flight rollout is not
    saved, so a rerun after kill -9 is a run restarted at that step. Every line equals the uninterrupted
    run's own restart from its checkpoint 1 exactly (floats compared with ==), every metric but those read
    off the clock (`*time_s`, `pipeline/sample_wait_time_s` among them, and `pipeline/sampler_bound`) and
    the compile count; it is not the uninterrupted run's step 2, which trained on a rollout one step old."""
    from shared_runs import compilation_cache
    from test_resume import _complete_lines, run_and_kill
    from test_train_script import assert_ok, checkpoint_steps, train

    cache = compilation_cache(tmp_path_factory)
    reference, restarted, workdir = tmp_path / "reference", tmp_path / "restarted", tmp_path / "run"
    assert_ok(train(reference, *KILLED_RUN, devices=2, cache=cache))
    uninterrupted = _lines(reference)
    assert [x["pipeline/lag"] for x in uninterrupted] == [0.0, 1.0, 1.0]
    assert uninterrupted[1]["pipeline/inflight"] == 1.0  # step 3's rollout, when step 2's line is written

    def ready():
        return 1 in checkpoint_steps(workdir) and any(x["step"] == 2 for x in _complete_lines(workdir))

    run_and_kill(
        workdir, tmp_path / "killed.log", cache, ready, overrides=KILLED_RUN, devices=2, HANG_AFTER="grpo:2"
    )
    assert checkpoint_steps(workdir) == [1]
    assert [_replayed(x) for x in _lines(workdir)] == [_replayed(x) for x in uninterrupted[:2]]
    result = train(workdir, *KILLED_RUN, devices=2, cache=cache)
    assert_ok(result)
    assert "at stage grpo step 1" in result.stderr

    shutil.copytree(reference, restarted)
    for step in (2, 3):
        shutil.rmtree(restarted / "checkpoints" / str(step))
    assert_ok(train(restarted, *KILLED_RUN, devices=2, cache=cache))

    resumed = _lines(workdir)
    assert [x["pipeline/lag"] for x in resumed] == [0.0, 0.0, 1.0]
    assert [_replayed(x) for x in resumed] == [_replayed(x) for x in _lines(restarted)]
    assert resumed[1]["loss"] != uninterrupted[1]["loss"]  # step 2 now trains on an on-policy rollout
