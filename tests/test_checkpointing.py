"""Checkpointer: sharded bitwise round trip, keep-last + best, NaN refusal, crash safety, damaged
checkpoints, fingerprints."""

import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from grpo_jax import models
from grpo_jax.checkpointing import (
    Checkpointer,
    DamagedCheckpointError,
    check_compatible,
    checkpoint_directory,
)
from grpo_jax.testing import mesh_2x2x2, tiny_model_config
from grpo_jax.training.state import OptimizerConfig, create_train_state, make_optimizer

FINGERPRINT = {"model": {"hidden_size": 32, "num_layers": 2, "vocab_size": 128}, "tokenizer_hash": "abc123"}


@pytest.fixture(scope="module")
def setup():
    """A trained-one-step state on the (2, 2, 2) mesh: sharded params, non-zero Adam moments, a reference
    and a reward model."""
    config = tiny_model_config()
    mesh = mesh_2x2x2()
    params = models.init_sharded_params(config, jax.random.key(0), mesh)
    param_shardings = models.model_param_shardings(mesh, config)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2))
    reward_params = {"reward_model": {"head": jnp.arange(6, dtype=jnp.float32).reshape(2, 3)}}
    state, shardings = create_train_state(
        params, optimizer, mesh, param_shardings, rng=jax.random.key(7), reward_params=reward_params
    )

    @jax.jit
    def one_update(state):
        grads = jax.tree_util.tree_map(lambda p: jnp.sin(p * 3.0) + 0.1, state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            rng=jax.random.fold_in(state.rng, 1),
        )

    state = one_update(state)
    return dict(
        config=config,
        mesh=mesh,
        optimizer=optimizer,
        param_shardings=param_shardings,
        state=state,
        shardings=shardings,
    )


def _bits(x):
    x = np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
    return x.dtype.str, x.shape, x.tobytes()


def _abstract(state):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def test_sharded_round_trip_is_bitwise(setup, tmp_path):
    state, shardings = setup["state"], setup["shardings"]
    assert float(np.abs(np.asarray(state.opt_state[1][0].mu["layers"]["q"])).max()) > 0  # Adam state is live
    expected = [_bits(x) for x in jax.tree_util.tree_leaves(state)]
    expected_shardings = jax.tree_util.tree_leaves(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
    )
    # save a copy and delete it right after save returns: the async write must not need the device buffers
    # (the trainer donates the state to the next step).
    copy = jax.tree_util.tree_map(jnp.copy, state)
    extra = {"stage": "grpo", "stage_step": 1, "data": {"epoch": 0, "index": 12}, "fingerprint": FINGERPRINT}
    with Checkpointer(checkpoint_directory(tmp_path)) as checkpointer:
        assert checkpointer.save(1, copy, extra=extra)
        jax.tree_util.tree_map(lambda x: x.delete(), copy)
        checkpointer.wait()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]

    with Checkpointer(tmp_path / "checkpoints") as checkpointer:
        assert checkpointer.latest_step() == 1
        restored, restored_extra = checkpointer.restore(_abstract(state), shardings, fingerprint=FINGERPRINT)
    assert restored_extra == extra
    assert [_bits(x) for x in jax.tree_util.tree_leaves(restored)] == expected
    restored_leaves = jax.tree_util.tree_leaves(restored)
    assert len(restored_leaves) == len(expected_shardings)
    for leaf, sharding in zip(restored_leaves, expected_shardings, strict=True):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    assert restored.params["layers"]["q"].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor", None
    )
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
    assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
    assert int(restored.step) == 1


def test_no_reference_and_no_reward_params(setup, tmp_path):
    mesh, optimizer = setup["mesh"], setup["optimizer"]
    state, shardings = create_train_state(
        setup["state"].params,
        optimizer,
        mesh,
        setup["param_shardings"],
        rng=jax.random.key(3),
        with_reference=False,
    )
    assert state.ref_params is None and state.reward_params == {}
    checkpointer = Checkpointer(tmp_path, async_save=False)
    assert checkpointer.save(5, state, extra={})
    restored, extra = checkpointer.restore(state, shardings)  # a concrete template works too
    assert extra == {}
    assert restored.ref_params is None and restored.reward_params == {}
    assert [_bits(x) for x in jax.tree_util.tree_leaves(restored)] == [
        _bits(x) for x in jax.tree_util.tree_leaves(state)
    ]
    # The config now asks for a reference: one clear message instead of an orbax stack trace.
    with pytest.raises(ValueError, match=r"only the current state has ref_params/.*use a new --workdir"):
        checkpointer.restore(_abstract(setup["state"]), setup["shardings"])
    checkpointer.close()


def _small_state(setup, value=1.0):
    state = setup["state"]
    return state.replace(params=jax.tree_util.tree_map(lambda p: jnp.full_like(p, value), state.params))


def test_keep_last_plus_best(setup, tmp_path):
    state = _small_state(setup)
    checkpointer = Checkpointer(tmp_path, keep_last=2, keep_best=1, async_save=False)
    accuracy = {2: 0.9, 4: 0.5, 5: float("nan")}  # steps 1, 3, 6 have no eval; NaN does not compete
    for step in range(1, 7):
        metrics = {"reward/mean": 0.1}
        if step in accuracy:
            metrics["eval/accuracy"] = accuracy[step]
        assert checkpointer.save(step, state, extra={"step": step}, metrics=metrics)
    assert checkpointer.all_steps() == [2, 5, 6]
    assert checkpointer.best_step() == 2
    assert checkpointer.latest_step() == 6
    assert not checkpointer.save(6, state, extra={})  # an existing step is not overwritten
    checkpointer.close()

    # The ranking survives a restart; a better checkpoint replaces the old best.
    checkpointer = Checkpointer(tmp_path, keep_last=2, keep_best=1, async_save=False)
    assert checkpointer.best_step() == 2
    assert checkpointer.save(7, state, extra={}, metrics={"eval/accuracy": 0.95})
    assert checkpointer.all_steps() == [6, 7]
    assert checkpointer.best_step() == 7
    checkpointer.close()


def test_keep_best_min_mode(setup, tmp_path):
    state = _small_state(setup)
    checkpointer = Checkpointer(
        tmp_path, keep_last=1, keep_best=2, best_metric="loss", best_mode="min", async_save=False
    )
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 5.0), (5, None)]:
        checkpointer.save(step, state, extra={}, metrics=None if loss is None else {"loss": loss})
    assert checkpointer.all_steps() == [2, 3, 5]
    assert checkpointer.best_step() == 2
    checkpointer.close()


def test_refuses_to_save_nan(setup, tmp_path, caplog):
    checkpointer = Checkpointer(tmp_path, async_save=False)
    state = setup["state"]
    poisoned_params = state.replace(
        params={**state.params, "embed": state.params["embed"].at[3, 5].set(jnp.nan)}
    )
    mu = state.opt_state[1][0].mu
    poisoned_opt = state.replace(
        opt_state=(
            state.opt_state[0],
            (
                state.opt_state[1][0]._replace(mu={**mu, "final_norm": mu["final_norm"] * jnp.inf}),
                *state.opt_state[1][1:],
            ),
        )
    )
    with caplog.at_level(logging.WARNING):
        assert not checkpointer.save(1, poisoned_params, extra={})
        assert not checkpointer.save(2, poisoned_opt, extra={})
    assert "refusing to save checkpoint at step 1: non-finite values in params" in caplog.text
    assert "refusing to save checkpoint at step 2: non-finite values in opt_state" in caplog.text
    assert checkpointer.refused_saves == 2
    assert checkpointer.latest_step() is None
    assert [name for name in os.listdir(tmp_path) if name[0].isdigit()] == []
    assert checkpointer.save(3, state, extra={})  # a clean state still saves
    assert checkpointer.all_steps() == [3]
    checkpointer.close()


def test_latest_step_ignores_unfinished_write(setup, tmp_path):
    checkpointer = Checkpointer(tmp_path, async_save=False)
    checkpointer.save(3, _small_state(setup), extra={"ok": True})
    checkpointer.close()
    # What a run killed while writing step 9 leaves behind.
    stray = tmp_path / "9.orbax-checkpoint-tmp"  # the name orbax 0.12 writes to before the rename
    (stray / "state").mkdir(parents=True)
    (stray / "state" / "partial").write_bytes(b"\0" * 16)
    checkpointer = Checkpointer(tmp_path, async_save=False)
    assert checkpointer.latest_step() == 3
    assert checkpointer.all_steps() == [3]
    assert checkpointer.read_extra() == {"ok": True}
    assert checkpointer.save(4, _small_state(setup), extra={})
    assert not stray.exists()  # removed by the manager (it waits for that cleanup before saving)
    assert checkpointer.all_steps() == [3, 4]
    checkpointer.close()


def test_closing_without_a_save_waits_for_the_tmp_folder_cleanup(setup, tmp_path):
    """Orbax cleans unfinished tmp folders in a thread it starts when the manager opens and awaits only
    before a save; a run that stops before its first save must not exit with that thread still running
    (it dies at interpreter exit with "cannot schedule new futures after shutdown")."""
    import threading

    stray = tmp_path / "9.orbax-checkpoint-tmp"
    (stray / "state").mkdir(parents=True)
    checkpointer = Checkpointer(tmp_path, async_save=False)
    cleanup = checkpointer._manager._cleanup_tmp_directory_future
    assert cleanup is not None
    checkpointer.close()
    assert checkpointer._manager._cleanup_tmp_directory_future is None
    assert not stray.exists()
    assert cleanup._t not in threading.enumerate()


def _truncate(path, keep=0.5):
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


# Damaged JSON items, and the state's own metadata (read before any array). Damaged array files are
# tested end to end in tests/test_resume.py, in a subprocess: a failed array read leaves orbax's other
# reads of that restore to report themselves later, outside what a test here could wait for.
@pytest.mark.parametrize(
    "damage, read, problem",
    [
        (
            lambda d: (d / "extra" / "metadata").unlink(),
            "extra",
            "extra: missing file: File extra/metadata not",
        ),
        (lambda d: _truncate(d / "extra" / "metadata"), "extra", "extra: not valid JSON: "),
        (lambda d: _truncate(d / "meta" / "metadata"), "restore", "meta: not valid JSON: "),
        (lambda d: _truncate(d / "meta" / "metadata"), "params", "meta: not valid JSON: "),
        (lambda d: _truncate(d / "state" / "_METADATA"), "restore", "state: not valid JSON: "),
        (lambda d: shutil.rmtree(d / "state"), "restore", 'state: missing item: Item "state" was not'),
    ],
    ids=[
        "extra-missing",
        "extra-truncated",
        "meta-truncated",
        "meta-truncated-params-only",
        "state-metadata-truncated",
        "state-missing",
    ],
)
def test_a_damaged_checkpoint_raises_one_clear_error_and_can_be_set_aside(
    setup, tmp_path, damage, read, problem
):
    state, shardings = setup["state"], setup["shardings"]
    checkpointer = Checkpointer(tmp_path, async_save=False)
    for step in (1, 2):
        assert checkpointer.save(step, state, extra={"step": step})
    damage(tmp_path / "2")
    with pytest.raises(DamagedCheckpointError) as error:
        if read == "extra":
            checkpointer.read_extra(2)
        elif read == "restore":
            checkpointer.restore(_abstract(state), shardings, step=2)
        else:
            checkpointer.restore_params(_abstract(state.params), setup["param_shardings"], step=2)
    assert error.value.step == 2 and error.value.directory == tmp_path
    message = str(error.value)
    assert message.startswith(f"checkpoint step 2 in {tmp_path} is damaged: {problem}"), message
    assert "\n" not in message and len(message) < 500 and "tensorstore_spec" not in message
    assert error.value.__cause__ is None  # the orbax/TensorStore chain is summed up, not attached

    # Set aside, the step is gone for the manager but kept on disk; the previous one restores intact.
    assert checkpointer.set_aside(2) == tmp_path / "2.damaged"
    assert checkpointer.all_steps() == [1] and checkpointer.latest_step() == 1
    assert checkpointer.set_aside_folders() == ["2.damaged"]
    restored, extra = checkpointer.restore(_abstract(state), shardings)
    assert extra == {"step": 1}
    assert [_bits(x) for x in jax.tree_util.tree_leaves(restored)] == [
        _bits(x) for x in jax.tree_util.tree_leaves(state)
    ]
    assert checkpointer.save(2, state, extra={"step": 2})  # the step is saved afresh
    assert checkpointer.set_aside(2).name == "2.damaged.2"  # an earlier set-aside copy is kept
    checkpointer.close()


def test_other_restore_failures_are_not_damage(setup, tmp_path):
    """A fingerprint or structure mismatch is a config problem: a plain ValueError, nothing set aside."""
    checkpointer = Checkpointer(tmp_path, async_save=False)
    checkpointer.save(1, _small_state(setup), extra={"fingerprint": FINGERPRINT})
    changed = {**FINGERPRINT, "tokenizer_hash": "other"}
    with pytest.raises(ValueError, match="tokenizer_hash") as error:
        checkpointer.restore(_abstract(setup["state"]), setup["shardings"], fingerprint=changed)
    assert not isinstance(error.value, DamagedCheckpointError)
    no_reference = setup["state"].replace(ref_params=None)
    with pytest.raises(ValueError, match="only the checkpoint has ref_params") as error:
        checkpointer.restore(_abstract(no_reference))
    assert not isinstance(error.value, DamagedCheckpointError)
    checkpointer.close()


def test_a_damaged_metrics_item_costs_only_the_best_rank(setup, tmp_path, caplog):
    """Orbax reads every step's ranking metrics when a manager starts; a truncated one used to fail that
    start with a JSON traceback. Now it warns once and that step no longer competes for best."""
    state = _small_state(setup)
    checkpointer = Checkpointer(tmp_path, keep_last=3, async_save=False)
    for step, accuracy in ((1, 0.9), (2, 0.5), (3, 0.1)):
        checkpointer.save(step, state, extra={}, metrics={"eval/accuracy": accuracy})
    checkpointer.close()
    _truncate(tmp_path / "1" / "metrics" / "metrics")
    with caplog.at_level(logging.WARNING):
        checkpointer = Checkpointer(tmp_path, keep_last=3, async_save=False)
        assert checkpointer.best_step() == 2
    warnings = [r.getMessage() for r in caplog.records if "metrics item is damaged" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"checkpoint step 1 in {tmp_path}:"), warnings
    assert checkpointer.all_steps() == [1, 2, 3] and checkpointer.read_extra(1) == {}
    checkpointer.close()


def test_fingerprint_mismatch_names_the_fields(tmp_path):
    saved = {"model": {"hidden_size": 64, "num_layers": 2}, "tokenizer_hash": "abc"}
    check_compatible(saved, {"model": {"hidden_size": 64, "num_layers": 2}, "tokenizer_hash": "abc"})
    with pytest.raises(ValueError) as error:
        check_compatible(
            saved,
            {"model": {"hidden_size": 128, "num_layers": 2}, "tokenizer_hash": "xyz"},
            directory=tmp_path / "checkpoints",
        )
    assert str(error.value) == (
        f"checkpoint in {tmp_path / 'checkpoints'} was made with model.hidden_size=64, "
        "the config now says 128; tokenizer_hash='abc', the config now says 'xyz'; "
        "use a new --workdir or restore the config"
    )


def test_restore_checks_fingerprint_and_missing_checkpoints(setup, tmp_path):
    checkpointer = Checkpointer(tmp_path / "checkpoints", async_save=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint to restore in .*checkpoints"):
        checkpointer.restore(_abstract(setup["state"]), setup["shardings"])
    checkpointer.save(2, _small_state(setup), extra={"fingerprint": FINGERPRINT})
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 4 .* available: \[2\]"):
        checkpointer.restore(_abstract(setup["state"]), setup["shardings"], step=4)
    changed = {**FINGERPRINT, "model": {**FINGERPRINT["model"], "num_layers": 4}}
    with pytest.raises(ValueError, match="made with model.num_layers=2, the config now says 4; use a new"):
        checkpointer.restore(_abstract(setup["state"]), setup["shardings"], fingerprint=changed)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        checkpointer.save(3, _small_state(setup), extra={"bad": object()})
    checkpointer.close()


def test_abandoned_read_reports_are_dropped_and_nothing_else():
    """The asyncio records abandoned reads leave behind after a damaged restore, in each form seen
    (orbax's wrapper, TensorStore's bare read error), are dropped; other errors still get through."""
    from grpo_jax import orbax_adapters

    def record(error):
        return logging.LogRecord(
            "asyncio", logging.ERROR, __file__, 1, "Future exception was never retrieved", None,
            (type(error), error, None),
        )  # fmt: skip

    noise = (
        ValueError('OUT_OF_RANGE: Error reading "params.layers.q/0.0.0.0" in OCDBT database at x'),
        ValueError("Encountered error while reading array index: (0,) of params"),
        RuntimeError("Event loop is closed"),
    )
    kept = (ValueError("shapes (3,) and (4,) differ"), RuntimeError("Error reading: boom"))
    drop = orbax_adapters._DropAbandonedReads()
    assert [drop.filter(record(error)) for error in noise] == [False] * len(noise)
    assert [drop.filter(record(error)) for error in kept] == [True] * len(kept)
