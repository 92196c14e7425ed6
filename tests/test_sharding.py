"""Meshes and the host's view of a batch, on the 8 fake CPU devices.

Meshes: `sharding.make_mesh` is `jax.make_mesh` with automatic axes for one slice, and lays a multislice
mesh out slice by slice (`hybrid_device_array`, checked with fake devices that carry a `slice_index`).
Rows: with the mesh's devices permuted, a device's row block does not follow its id, and a process's
devices hold row blocks that are not one contiguous run of the batch; host-side work (host rewards,
process step rewards, the reward-model retrainer, evaluation) must still pair every row with its own
example and put every result back on its own row.
"""

from __future__ import annotations

import collections
import dataclasses
import types

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType

from grpo_jax import sharding
from grpo_jax.data.tasks import ArithmeticTask
from grpo_jax.rewards.host import math_accuracy_reward
from grpo_jax.rewards.process import STEP_VERIFIERS, process_step_rewards
from grpo_jax.testing import tiny_model_config, tiny_params, tiny_tokenizer
from grpo_jax.training.evaluator import Evaluator, math_correct
from grpo_jax.training.stages.grpo import GRPOStage
from grpo_jax.training.stages.rm_retrain import RewardModelRetrainer, pairs_from_groups
from grpo_jax.training.stages.rollout import local_rollout

# (data, fsdp) row block k lives on mesh[k // 2, k % 2, :]; this order puts devices 0-3 (a "process") on
# blocks 0 and 2 and devices 4-7 on blocks 1 and 3: no block follows its devices' ids.
PERMUTED = (0, 1, 4, 5, 2, 3, 6, 7)


def permuted_mesh():
    return sharding.make_mesh((2, 2, 2), devices=[jax.devices()[i] for i in PERMUTED])


# ------------------------------------------------------------------------------------------------
# Meshes
# ------------------------------------------------------------------------------------------------


def test_one_slice_mesh_is_jax_make_mesh_with_automatic_axes():
    mesh = sharding.make_mesh((2, -1, 2))
    want = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    assert mesh.axis_names == sharding.MESH_AXES and dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert [d.id for d in mesh.devices.flat] == [d.id for d in want.devices.flat]
    # jax.make_mesh's own default is Explicit axes, which would change how every program is sharded.
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert [d.id for d in permuted_mesh().devices.flat] == list(PERMUTED)  # given devices keep their order
    assert sharding.make_mesh((2, 2, 2), dcn_shape=(1, 1, 1)).devices.tolist() == mesh.devices.tolist()


@dataclasses.dataclass(frozen=True)
class FakeHostDevice:
    """A device without `slice_index` (GPU, CPU): slices are its host's devices."""

    id: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


@dataclasses.dataclass(frozen=True)
class FakeSliceDevice(FakeHostDevice):
    """A multislice TPU device stand-in."""

    slice_index: int = 0


def test_multislice_mesh_puts_each_slice_on_its_block_of_the_dcn_axes():
    # 2 slices of 4 devices, listed interleaved: grouping is by slice_index, not by position.
    devices = [FakeSliceDevice(id=i, process_index=i // 2, slice_index=i % 2) for i in range(8)]
    slice_of = np.vectorize(lambda d: d.slice_index)

    data_over_slices = sharding.hybrid_device_array((4, 1, 2), (2, 1, 1), devices)
    assert data_over_slices.shape == (4, 1, 2)
    assert (slice_of(data_over_slices[:2]) == 0).all() and (slice_of(data_over_slices[2:]) == 1).all()

    fsdp_over_slices = sharding.hybrid_device_array((2, 2, 2), (1, 2, 1), devices)
    assert (slice_of(fsdp_over_slices[:, 0]) == 0).all() and (slice_of(fsdp_over_slices[:, 1]) == 1).all()
    assert sorted(d.id for d in fsdp_over_slices.flat) == list(range(8))

    hosts = [FakeHostDevice(id=i, process_index=i // 4) for i in range(8)]  # no slice_index: by host
    one_slice = [FakeSliceDevice(id=i, process_index=i // 4, slice_index=0) for i in range(8)]  # CPU's
    for devices in (hosts, one_slice):
        by_host = sharding.hybrid_device_array((2, 2, 2), (2, 1, 1), devices)
        assert [d.process_index for d in by_host[0].flat] == [0] * 4
        assert [d.process_index for d in by_host[1].flat] == [1] * 4


def test_multislice_mesh_errors_are_one_clear_line():
    devices = [FakeSliceDevice(id=i, process_index=0, slice_index=i // 4) for i in range(8)]
    with pytest.raises(ValueError, match=r"span 2 slices: give a dcn mesh shape \(config.dcn_mesh\)"):
        sharding.make_mesh((2, 2, 2), devices=devices)
    with pytest.raises(ValueError, match="needs 4 slices but the 8 devices form 2 .grouped by slice_index"):
        sharding.make_mesh((4, 2, 1), devices=devices, dcn_shape=(4, 1, 1))
    with pytest.raises(ValueError, match="must divide the mesh shape"):
        sharding.make_mesh((2, 4, 1), devices=devices, dcn_shape={"data": 1, "fsdp": 3})
    with pytest.raises(ValueError, match="dcn mesh shape: unknown axis name"):
        sharding.make_mesh((2, 4, 1), devices=devices, dcn_shape={"slice": 2})
    # The 8 CPU devices of this one process form one host, hence one "slice".
    with pytest.raises(ValueError, match="needs 2 slices but the 8 devices form 1 .grouped by process_index"):
        sharding.make_mesh((2, 2, 2), dcn_shape=(2, 1, 1))


# ------------------------------------------------------------------------------------------------
# A process's rows
# ------------------------------------------------------------------------------------------------


def test_a_process_reads_and_writes_its_own_rows_by_their_global_numbers():
    mesh = permuted_mesh()
    values = np.arange(16 * 3).reshape(16, 3)
    x = jax.device_put(values, sharding.batch_sharding(mesh, 2))
    process0 = jax.devices()[:4]
    rows, local = sharding.local_rows({"x": x}, mesh, devices=process0)
    assert rows.tolist() == [0, 1, 2, 3, 8, 9, 10, 11]  # two blocks, not one contiguous run
    np.testing.assert_array_equal(local["x"], values[rows])
    rows1, _ = sharding.local_rows(x, mesh, devices=jax.devices()[4:])
    assert sorted(rows.tolist() + rows1.tolist()) == list(range(16))

    # This (only) process holds every row; an array laid out otherwise is read in the batch layout.
    rows, local = sharding.local_rows(jax.device_put(values, sharding.replicated(mesh)), mesh)
    assert rows.tolist() == list(range(16)) and np.array_equal(local, values)
    placed = sharding.from_local_rows({"y": values[:, 0]}, rows, mesh, 16)["y"]
    assert placed.sharding.is_equivalent_to(sharding.batch_sharding(mesh, 1), 1)
    np.testing.assert_array_equal(np.asarray(placed), values[:, 0])
    with pytest.raises(ValueError, match="this process holds"):
        sharding.from_local_rows(values[:8, 0], np.arange(8), mesh, 16)
    assert sharding.sum_over_processes({"a": 2.5, "n": 3}) == {"a": 2.5, "n": 3.0}


def _distinct_answer_examples(count: int) -> list[dict]:
    examples, answers = [], set()
    for example in ArithmeticTask(seed=0, num_digits=(1, 2), operations=("+",)).split("train", 64):
        if example["answer"] not in answers:
            examples.append(example)
            answers.add(example["answer"])
    return examples[:count]


def _rollout(mesh, tokenizer, texts: list[str]):
    """A sampler-like Rollout of `texts` (each ended by EOS, right-padded), rows in the batch layout."""
    ids = [tokenizer.encode(t, add_bos=False) + [tokenizer.eos_id] for t in texts]
    length = max(len(i) for i in ids)
    tokens = np.full((len(ids), length), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(ids), length), np.int32)
    for row, i in enumerate(ids):
        tokens[row, : len(i)], mask[row, : len(i)] = i, 1
    place = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
    truncated = np.zeros(len(ids), bool)
    return (
        types.SimpleNamespace(tokens=place(tokens), mask=place(mask), truncated=place(truncated)),
        tokens,
        mask,
    )


def test_host_and_step_rewards_land_on_their_rows_with_a_permuted_mesh():
    """Prompt b (example example_index[b]) has rows 4b..4b+3; row r carries the worked solution of
    example SOURCE[r], so its host reward is 1 exactly when that is its own prompt's example."""
    mesh, tokenizer, G = permuted_mesh(), tiny_tokenizer(), 4
    examples = _distinct_answer_examples(4)
    example_index = np.array([2, 0, 3, 1], np.int32)
    source = [(5 * r + r // 4) % 4 for r in range(16)]
    texts = [examples[s]["completion"] for s in source]
    rollout, tokens, mask = _rollout(mesh, tokenizer, texts)
    placed = sharding.shard_batch({"example_index": example_index}, mesh)
    row_examples = [examples[example_index[r // G]] for r in range(16)]

    config = ml_collections.ConfigDict(
        {
            "stages": ("grpo",),
            "grpo": {"host_rewards": (("math_accuracy", 1.0),), "host_reward_timeout_s": 5.0},
        }
    )
    stage = GRPOStage(types.SimpleNamespace(config=config, mesh=mesh, tokenizer=tokenizer), 0)
    stage.examples, stage.retrainer, stage.step_verifier = examples, None, STEP_VERIFIERS["arithmetic"]
    stage.build_host_rewards()
    stage.host_runner.num_workers = 0  # score in this process
    extras, logged = stage.host_batch_extras(rollout, placed, G)

    want = np.array([math_accuracy_reward(t, e) for t, e in zip(texts, row_examples)], np.float32)
    assert 0 < want.sum() < 16 and len({tuple(want[k : k + 4]) for k in range(0, 16, 4)}) > 1
    assert extras["host_rewards"].sharding.is_equivalent_to(sharding.batch_sharding(mesh, 1), 1)
    np.testing.assert_array_equal(np.asarray(extras["host_rewards"]), want)
    assert logged["host_reward/math_accuracy"] == pytest.approx(want.mean())
    steps = process_step_rewards(
        tokenizer, tokens, mask, row_examples, max_steps=8, verifier=STEP_VERIFIERS["arithmetic"]
    )
    assert steps["step_rewards"].std() > 0
    for key, value in steps.items():
        np.testing.assert_array_equal(np.asarray(extras[key]), value, err_msg=key)

    # What one process of a pod would score: its two row blocks, each with its own prompt's example.
    local = local_rollout(rollout, placed, G, mesh, devices=jax.devices()[:4])
    assert local.rows.tolist() == [0, 1, 2, 3, 8, 9, 10, 11] and local.num_rows == 16
    assert local.example_index.tolist() == example_index[local.rows // G].tolist()
    np.testing.assert_array_equal(local.tokens, tokens[local.rows])
    assert stage.decode(local) == [texts[r] for r in local.rows]


def test_the_retrainer_pairs_whole_groups_from_rows_given_in_any_order():
    retrainer = RewardModelRetrainer.__new__(RewardModelRetrainer)
    retrainer.correct, retrainer.buffer = math_correct, collections.deque()
    examples = _distinct_answer_examples(3)
    rows_examples = [examples[r // 2] for r in range(6)]
    texts = [examples[[0, 1, 1, 1, 2, 0][r]]["completion"] for r in range(6)]  # group 1 all correct
    order = [3, 0, 5, 1, 4, 2]  # as a process might hold them
    retrainer.observe(order, [texts[r] for r in order], [rows_examples[r] for r in order], 2)
    correct = [math_correct(t, e) for t, e in zip(texts, rows_examples)]
    want = pairs_from_groups(texts, rows_examples, correct, 2)
    assert list(retrainer.buffer) == want and len(want) == 2


def test_evaluation_reads_the_rollout_in_row_order_on_a_permuted_mesh():
    tokenizer = tiny_tokenizer()
    config = tiny_model_config(vocab_size=tokenizer.vocab_size)
    # Weights scaled up so that greedy completions depend on the prompt (a fresh init's do not).
    params = jax.tree_util.tree_map(lambda p: 4 * p, tiny_params(config))
    examples = ArithmeticTask(seed=0).split("test", 8)

    def evaluate(mesh):
        evaluator = Evaluator(
            config,
            tokenizer,
            examples,
            template="plain",
            max_prompt_len=12,
            max_new_tokens=6,
            batch_size=8,
            mesh=mesh,
        )
        metrics = evaluator(params, jax.random.key(0))
        return evaluator.last_greedy_texts, metrics

    texts, metrics = evaluate(None)
    assert len(set(texts)) == 8  # rows that differ, so a misplaced block would show
    assert evaluate(permuted_mesh()) == (texts, metrics)
