"""Partial rollouts in the pipeline (docs/ARCHITECTURE.md, "Partial rollouts in the pipeline"):
`config.engine.rollout_token_budget` together with `config.grpo.off_policy_steps` = k and/or
`config.sampler_mesh`. Every token carries the version of the params that drew it; a carried row holds
tokens of several versions; each token's behaviour logprob is its own version's; the oldest token of a
trained group is at most k + (steps carried) updates old, checked every step and refused when broken;
k = 0 on a 4 + 4 split is the co-located partial-rollout run on 4 devices bit for bit, and k = 0
co-located keeps today's path (the engine state in the TrainState). Runs train in this process, on
conftest's 8 CPU devices, with test_async's GRPO-only quickstart:runlocal."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_async import OVERRIDES, _config, _numbers, _train

from grpo_jax import models
from grpo_jax.training import pipeline
from grpo_jax.training.stages import STAGE_KINDS
from grpo_jax.training.stages import grpo as grpo_stage

# Partial rollouts at 4 decode iterations a step for completions of up to 12 tokens: rows stay in flight
# across steps (and so across policy versions); 4 steps so carried groups complete and are trained.
PARTIAL = {"sampler": "engine", "engine.rollout_token_budget": 4, "grpo.steps": 4}


def test_the_oldest_token_bounds_a_groups_staleness_and_the_check_fails_when_broken():
    """`oldest_versions` takes the min over a group's valid tokens; `check_partial_lag` accepts a group
    enqueued at step e whose oldest token is of a version in [e − k, e] (its staleness then <= k + the
    steps it was carried) and raises one line otherwise; fill places are not checked."""
    version = np.array([[3, 4, 9], [5, 5, 5], [0, 0, 0], [0, 0, 0]], np.int32)  # 2 groups of 2 rows
    mask = np.array([[1, 1, 0], [1, 1, 1], [0, 0, 0], [0, 0, 0]], np.int32)
    oldest = np.asarray(pipeline.oldest_versions(version, mask, 2))
    assert oldest[0] == 3 and oldest[1] == np.iinfo(np.int32).max  # the 9 is past the row's end
    fill = np.array([False, True])
    carried = pipeline.check_partial_lag(7, oldest, np.array([4, 0]), fill, 1)  # 7 − 3 = 4 <= 1 + 3
    assert carried == {"partial/carried_steps_mean": 3.0, "partial/carried_steps_max": 3.0}
    cases = [
        (np.array([5, 0]), 1, "enqueued at step 5 whose oldest token is of policy version 3: 4 updates old"),
        (np.array([2, 0]), 1, "enqueued at step 2"),  # a token older than its group's enqueue: bad tags
        (np.array([8, 0]), 9, "enqueued at step 8"),  # enqueued after the step that trains it
    ]
    for enqueued, k, message in cases:
        with pytest.raises(RuntimeError, match=message) as error:
            pipeline.check_partial_lag(7, oldest, enqueued, fill, k)
        assert "\n" not in str(error.value)
    pipeline.check_partial_lag(7, oldest, np.array([5, 0]), fill, 2)  # the same group within k = 2


def test_partial_rollouts_compose_with_the_pipeline_in_the_config():
    """No refusal any more: partial rollouts validate with k >= 1, with a sampler mesh, and both; the
    pipeline's own requirements (an `is_correction`) still hold."""
    grpo = STAGE_KINDS["grpo"]
    for changes in ({"grpo.off_policy_steps": 2}, {"sampler_mesh": (4, 1)}):
        grpo.validate(_config(**PARTIAL, **changes), "grpo")
    grpo.validate(_config(**PARTIAL, **{"grpo.off_policy_steps": 1}, sampler_mesh=(2, 2)), "grpo")
    with pytest.raises(ValueError, match="is_correction") as error:
        grpo.validate(_config(**PARTIAL, **{"grpo.algo.is_correction": "none"}, sampler_mesh=(4, 1)), "grpo")
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def recorded_one_step_off(tmp_path_factory, request):
    """k = 1 co-located with partial rollouts and params that move (lr 1e-2): the sampler's params of
    every version (as pushed: what the engine decoded with) and every step's batch, recorded."""
    mp = pytest.MonkeyPatch()
    request.addfinalizer(mp.undo)
    pushed, batches = {}, {}
    push = grpo_stage.GRPOStage.push_weights

    def record_push(self, state, version, *, wait):
        synced = push(self, state, version, wait=wait)
        pushed[version] = jax.device_get(synced.params)
        pushed["model_config"] = self.run.model_config
        return synced

    make_step = grpo_stage.make_grpo_step

    def record_step(*args, **kwargs):
        step = make_step(*args, **kwargs)

        def run(state, batch):
            batches[int(state.step)] = jax.device_get(batch)
            return step(state, batch)

        return run

    mp.setattr(grpo_stage.GRPOStage, "push_weights", record_push)
    mp.setattr(grpo_stage, "make_grpo_step", record_step)
    # 6 steps: the first updates train fill places only (the params stay), later ones move them
    lines = _train(
        tmp_path_factory.mktemp("partial_k1"), **{**PARTIAL, "grpo.steps": 6, "grpo.off_policy_steps": 1}
    )
    return lines, pushed, batches


def test_one_step_off_tags_every_token_with_the_params_that_drew_it(recorded_one_step_off):
    """The engine call of step t runs under the params of step t − 1 (t >= 1; step 0: its own), so the
    update of step t trains on tokens of versions <= t − 1, a carried row holding tokens of several
    consecutive versions (step t − 2's params and step t − 1's in one row), versions non-decreasing along
    it; the oldest token of each group is within k = 1 of its enqueue step (checked by the stage) and
    the per-token staleness is logged."""
    lines, _, batches = recorded_one_step_off
    assert [x["pipeline/lag"] for x in lines] == [0.0] + [1.0] * 5
    assert sum(x["partial/complete_groups"] for x in lines) > 0
    spans = 0
    for t, batch in batches.items():
        valid = (np.asarray(batch["completion_mask"]) > 0) & ~np.asarray(batch["fill"])[:, None]
        version = np.asarray(batch["behaviour_version"])
        if not valid.any():
            continue
        assert version[valid].max() <= max(t - 1, 0)
        assert (np.diff(np.where(valid, version, 10**6), axis=1)[valid[:, 1:]] >= 0).all()
        for row in range(version.shape[0]):
            tags = set(version[row][valid[row]].tolist())
            spans += {t - 2, t - 1} <= tags
    assert spans > 0, "no row carried tokens of step t − 2's and step t − 1's params"
    for x in lines:
        assert x["staleness/max"] <= 1 + x["partial/carried_steps_max"]
    assert max(x["staleness/max"] for x in lines) >= 2  # carried tokens: older than k alone
    assert all(x["staleness/mean"] > 0 for x in lines if x["partial/complete_groups"])


def test_each_tokens_behaviour_logprob_is_that_of_the_version_that_drew_it(recorded_one_step_off):
    """Replay every trained row token by token with the version each token is tagged with: the prompt's
    keys under its prefill's version (token 0's), token i drawn from the logits of its own version's
    forward of token i − 1 over the keys kept so far (the engine keeps a carried row's keys, each
    computed by the version that fed it: `slots` module docstring). The behaviour logprobs
    (`old_logprobs`) equal the replay's to float tolerance; the same replay with one version for the whole
    row (the oldest) misses them on carried rows, so the tags are not right by accident (the params
    moved)."""
    _, pushed, batches = recorded_one_step_off
    config = pushed["model_config"]
    checked, moved = 0, 0.0
    for batch in batches.values():
        version = np.asarray(batch["behaviour_version"])
        valid = (np.asarray(batch["completion_mask"]) > 0) & ~np.asarray(batch["fill"])[:, None]
        if not valid.any():
            continue
        behaviour = np.asarray(batch["old_logprobs"])
        replay = _replay_logprobs(config, pushed, batch, version)
        np.testing.assert_allclose(replay[valid], behaviour[valid], atol=2e-5)
        checked += int(valid.sum())
        oldest = np.where(valid, version, 10**6).min(axis=1, keepdims=True)
        single = _replay_logprobs(config, pushed, batch, np.where(valid, oldest, version))
        moved = max(moved, np.abs(single[valid] - behaviour[valid]).max())
    assert checked > 0 and moved > 1e-3


_forward_with_cache = jax.jit(
    lambda *args: models.forward_with_cache(*args, last_only=True), static_argnums=(0,)
)


def _replay_logprobs(config, pushed, batch, version):
    """[N, L] logprobs (full softmax, temperature 1) of the batch's completions decoded with the KV cache
    of `models.forward_with_cache`, the params of each step picked per row from `pushed` by `version`
    (the prefill and token 0 by column 0; token i's logits, and so its feed of token i − 1, by column i)."""
    prompt_tokens, prompt_mask = np.asarray(batch["prompt_tokens"]), np.asarray(batch["prompt_mask"])
    tokens = np.asarray(batch["completion_tokens"])
    (n, p), length = prompt_tokens.shape, tokens.shape[1]
    key_mask = np.pad(prompt_mask, ((0, 0), (0, length))).astype(np.int32)
    lengths = prompt_mask.sum(axis=1)
    cache = models.init_cache(config, n, p + length)
    out = np.zeros(tokens.shape, np.float32)
    for i in range(length):
        if i:
            key_mask[:, p + i - 1] = 1
            args = (tokens[:, i - 1 : i], (lengths + i - 1)[:, None], cache, p + i - 1, key_mask)
        else:
            args = (prompt_tokens, models.positions_from_mask(prompt_mask), cache, 0, key_mask)
        logits, caches = 0.0, {}
        for v in np.unique(version[:, i]):
            rows = version[:, i] == v
            step_logits, caches[v] = _forward_with_cache(config, pushed[int(v)], *args)
            logits = np.where(rows[:, None], np.asarray(step_logits[:, -1]), logits)
        cache = {
            name: sum(
                np.where((version[:, i] == v)[None, :, None, None, None], np.asarray(c[name]), 0.0)
                for v, c in caches.items()
            )
            for name in ("k", "v")
        }
        logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1))
        out[:, i] = np.take_along_axis(logp, tokens[:, i : i + 1], axis=1)[:, 0]
    return out


# ------------------------------------------------------------------------------------------------
# k = 0: co-located unchanged; on a 4 + 4 split, the co-located run on the trainer's 4 devices
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def partial_colocated_on_4(tmp_path_factory) -> list[dict]:
    """The co-located partial-rollout run (k = 0) on 4 devices: a subprocess, since this process has 8."""
    from test_async import _lines
    from test_train_script import assert_ok, train

    workdir = tmp_path_factory.mktemp("partial_colocated")
    overrides = [
        f"--config.{k}={v!r}" if not isinstance(v, str) else f"--config.{k}={v}"
        for k, v in {**OVERRIDES, **PARTIAL}.items()
    ]
    assert_ok(train(workdir, *overrides, devices=4))
    return [x for x in _lines(workdir) if x["stage"] == "grpo"]


def test_k_0_co_located_keeps_todays_partial_rollouts(partial_colocated_on_4):
    """Without k or a sampler mesh the stage takes today's path (`collect_partial`, the engine state in
    `TrainState.aux["rollout"]`, checkpointed), not the pipeline: none of its keys in the metrics. Its
    numbers are those of the commit before the composition bit for bit (compared by hand; nothing here
    runs the old code)."""
    for line in partial_colocated_on_4:
        assert not any(k.startswith(("pipeline/", "sync/", "partial/carried")) for k in line)
        assert "partial/complete_groups" in line


def test_a_4_plus_4_split_with_partial_rollouts_and_k_0_is_the_colocated_run(
    tmp_path, partial_colocated_on_4
):
    """The engine on the sampler's 4 devices (its state held by the stage, the params pushed each step)
    against the engine on the trainer's 4 devices in the TrainState: every metric of every step equal
    bit for bit, the partial-rollout counters included; tokens carried over steps (complete groups after
    fill places) and each trained group's oldest token within its carried steps (k = 0)."""
    split = _train(tmp_path, sampler_mesh=(4, 1), **PARTIAL)
    assert len(split) == len(partial_colocated_on_4) == 4
    for mine, theirs in zip(split, partial_colocated_on_4):
        assert _numbers(mine, drop=("partial/carried_steps",)) == _numbers(theirs)
        assert mine["pipeline/lag"] == 0 and mine["sync/bytes"] > 0
        assert mine["staleness/max"] <= mine["partial/carried_steps_max"]
    assert any(x["partial/complete_groups"] for x in split) and any(x["partial/fill_groups"] for x in split)
    assert max(x["staleness/max"] for x in split) > 0


def test_a_resume_starts_the_engine_empty_at_the_checkpointed_data_position(tmp_path):
    """k = 1, a checkpoint after every step, none holding the engine (it is the sampler's): rerun from
    checkpoint 2 (steps 3 and 4 deleted), the resumed step samples its own call under the restored params
    (lag 0) from an empty engine, then the pipeline is one step off again."""
    import shutil

    from grpo_jax.checkpointing import Checkpointer, checkpoint_directory

    changes = {
        **PARTIAL,
        "grpo.off_policy_steps": 1,
        "grpo.checkpoint_every": 1,
        "checkpoint.keep_last": 4,
        "checkpoint.async_save": False,
    }
    first = _train(tmp_path, **changes)
    assert [x["pipeline/lag"] for x in first] == [0.0, 1.0, 1.0, 1.0]
    with Checkpointer(checkpoint_directory(tmp_path), read_only=True) as checkpointer:
        assert not any(leaf.startswith("aux/rollout") for leaf in checkpointer.read_meta(2)["leaves"])
    for step in (3, 4):
        shutil.rmtree(tmp_path / "checkpoints" / str(step))
    lines = _train(tmp_path, **changes)
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert [x["pipeline/lag"] for x in lines] == [0.0, 1.0, 0.0, 1.0]
    assert lines[2]["partial/prompt_batches"] == 4  # an empty engine takes max_inflight_groups / B batches
