"""Dynamic sampling with refill (DAPO arXiv 2503.14476 §3.2; `grpo_jax.training.refill`).

The group selection and the generation batch size to exact numbers; the merge of the rounds' batches row
by row on an 8-device (2, 2, 2) mesh; `fill` rows at sample weight 0 in the step; and a `grpo` stage with
`dynamic_sampling_refill` through `scripts/train.py`: every step's batch holds exactly
`prompts_per_step` groups, the groups the stage kept are exactly the ones the step finds with signal
(its `zero_variance_frac` is the fill share), extra rounds happen, and a run stopped mid-stage and rerun
writes the uninterrupted run's metrics.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from shared_runs import compilation_cache, with_compilation_cache

from grpo_jax import sharding
from grpo_jax.algorithms import GRPOConfig
from grpo_jax.training import refill
from grpo_jax.training.grpo_step import sample_weights

REPO = Path(__file__).resolve().parents[1]
T, F = True, False


def test_select_groups_keeps_signal_in_round_order_and_counts_surplus():
    selection = refill.select_groups([np.array([T, F, T]), np.array([F, F, T])], target=2)
    assert selection.round_index.tolist() == [0, 1] and selection.group_index.tolist() == [1, 0]
    assert selection.fill.tolist() == [F, F]
    assert (selection.kept, selection.dropped, selection.surplus, selection.shortfall) == (2, 3, 1, 0)


def test_select_groups_fills_a_shortfall_with_zero_variance_groups():
    selection = refill.select_groups([np.array([T, T, F]), np.array([T, F, T])], target=4)
    assert list(zip(selection.round_index.tolist(), selection.group_index.tolist())) == [
        (0, 2),
        (1, 1),
        (0, 0),
        (0, 1),
    ]
    assert selection.fill.tolist() == [F, F, T, T]
    assert (selection.kept, selection.dropped, selection.surplus, selection.shortfall) == (2, 4, 0, 2)
    assert refill.enough([np.array([T, T, F]), np.array([T, F, T])], 2)
    assert not refill.enough([np.array([T, T, F]), np.array([T, F, T])], 3)
    with pytest.raises(ValueError, match="fewer than the 7"):
        refill.select_groups([np.array([T, T, F]), np.array([T, F, T])], target=7)


@pytest.mark.parametrize(
    "prompts, oversample, data_parallel, expected",
    [(16, 1.0, 1, 16), (16, 1.5, 1, 24), (16, 1.3, 8, 24), (2, 1.5, 1, 3), (2, 1.0, 4, 4), (3, 3.0, 2, 10)],
)
def test_generation_batch_size(prompts, oversample, data_parallel, expected):
    assert refill.generation_batch_size(prompts, oversample, data_parallel) == expected


def test_merge_rounds_takes_the_selected_rows_on_a_multi_axis_mesh():
    """G = 2, rounds of 4 groups (8 rows), a batch of 4 groups from both rounds, on a (2, 2, 2) mesh."""
    mesh = sharding.make_mesh((2, 2, 2), devices=jax.devices()[:8])
    G, groups = 2, 4

    def round_batch(r):
        rows = np.arange(groups * G)
        host = {
            "tokens": (100 * r + rows[:, None] * 10 + np.arange(3)[None, :]).astype(np.int32),
            "reward": (r + rows / 100).astype(np.float32),
            "flag": rows % 3 == 0,
        }
        return sharding.shard_batch(host, mesh)

    rounds = [round_batch(0), round_batch(1)]
    selection = refill.select_groups([np.array([T, F, T, F]), np.array([T, F, T, T])], target=4)
    expected_groups = [(0, 1), (0, 3), (1, 1), (0, 0)]  # 3 with signal, then one fill
    batch = refill.merge_rounds(refill.make_merge(mesh), rounds, selection, G)
    host_rounds = [jax.device_get(b) for b in rounds]
    for key in ("tokens", "reward", "flag"):
        expected = np.concatenate([host_rounds[r][key][g * G : (g + 1) * G] for r, g in expected_groups])
        np.testing.assert_array_equal(np.asarray(batch[key]), expected)
    assert np.asarray(batch["fill"]).tolist() == [F] * 6 + [T] * 2
    assert batch["tokens"].sharding.spec[0] == sharding.BATCH_AXES


def test_fill_rows_get_sample_weight_zero():
    grpo = GRPOConfig(num_generations=2)
    zero_variance = jnp.array([F, F, T, T, F, F])
    truncated = jnp.zeros(6, bool)
    fill = jnp.array([F, F, F, F, T, T])
    weight, _ = sample_weights(grpo, zero_variance, truncated, fill)
    np.testing.assert_array_equal(weight, [1, 1, 1, 1, 0, 0])
    weight, _ = sample_weights(grpo, zero_variance, truncated)
    np.testing.assert_array_equal(weight, [1, 1, 1, 1, 1, 1])


def test_refill_rejects_process_supervision_and_bad_values():
    with pytest.raises(ValueError, match="dynamic_sampling_refill"):
        GRPOConfig(dynamic_sampling_refill=True, advantage_estimator="process", kl_coef=0.0)
    with pytest.raises(ValueError, match="refill_oversample"):
        GRPOConfig(refill_oversample=0.5)
    with pytest.raises(ValueError, match="refill_max_rounds"):
        GRPOConfig(refill_max_rounds=-1)


# ---------------------------------------------------------------- the stage, through scripts/train.py

# A random tiny policy and a reward for one token appearing: about half the groups have unequal rewards.
CONFIG = """
from grpo_jax.config_utils import sibling_config

def get_config(arg=None):
    c = sibling_config({quickstart!r}, "quickstart.py", "runlocal")
    c.stages = ("grpo",)
    c.grpo.update(steps=4, eval_every=0, checkpoint_every=2, prompts_per_step=2)
    c.grpo.rewards = (("contains_token", 1.0, {{"token_id": 9}}),)
    c.grpo.algo.update(dynamic_sampling_refill=True, refill_oversample=1.5, refill_max_rounds=2, kl_coef=0.0)
    c.checkpoint.async_save = False
    c.max_nonfinite_in_a_row = 1
    return c
"""


def _train(config: Path, workdir: Path, *overrides: str, cache: Path) -> subprocess.CompletedProcess:
    """scripts/train.py on one CPU device; the three runs share the session's compilation cache
    (tests/shared_runs.py): the first compiles the config's programs, the others load them."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env = with_compilation_cache(env, cache)
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts/train.py"),
            f"--config={config}",
            f"--workdir={workdir}",
            *overrides,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _lines(workdir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if "time" not in k and k != "compiles"} for x in lines]


def test_refill_stage_fixed_batch_and_exact_resume(tmp_path, tmp_path_factory):
    cache = compilation_cache(tmp_path_factory)
    config = tmp_path / "refill.py"
    config.write_text(CONFIG.format(quickstart=str(REPO / "configs" / "quickstart.py")))
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    result = _train(config, straight, cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [x for x in _lines(straight) if x["stage"] == "grpo"]
    assert len(steps) == 4
    for m in steps:
        assert m["refill/kept_groups"] + m["refill/fill_groups"] == 2
        assert m["refill/groups_sampled"] == 3 * m["refill/rounds"] and 1 <= m["refill/rounds"] <= 3
        assert (
            m["refill/kept_groups"] + m["refill/surplus_groups"] + m["refill/dropped_groups"]
            == (m["refill/groups_sampled"])
        )
        # The step recomputes the rewards: the groups it finds without signal are exactly the fill.
        assert m["zero_variance_frac"] == pytest.approx(m["refill/fill_groups"] / 2)
    assert any(m["refill/rounds"] > 1 for m in steps) and sum(m["refill/kept_groups"] for m in steps) > 0

    result = _train(config, stopped, "--config.debug.poison_step=3", cache=cache)  # stops at 3; checkpoint 2
    assert result.returncode != 0 and "non-finite" in result.stderr, result.stderr[-3000:]
    result = _train(config, stopped, cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _lines(stopped) == _lines(straight)
