"""Checkpoints of the whole train state with orbax: save, keep last-N plus best, restore into shardings.

Layout of `DIR/checkpoints/` (orbax CheckpointManager): one folder per step, each with three items:
  state/   every array of the TrainState as a nested dict keyed by the pytree path
           (params, opt_state, ref_params, reward_params, step, rng as raw key data, aux)
  extra/   a JSON dict from the trainer: data iterator position, stage, stage step, config
           fingerprint, counters, ...
  meta/    a JSON dict written here: format version, PRNG implementation of each typed key, and the
           shape/dtype of every saved leaf (so a structure mismatch gives one clear message)

Orbax writes each step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a run
killed mid-write leaves no folder that `latest_step` would pick. A checkpoint is never written when
params, optimizer state or reference hold a NaN/inf: resuming would only replay the divergence.

A complete folder can still be damaged later (a file deleted, a copy cut short, a full disk on a
filesystem without atomic rename): reading one raises `DamagedCheckpointError` (which step, which item,
what is wrong) instead of an orbax/TensorStore traceback, and `set_aside` moves it to
`<step>.damaged` so that the run can fall back to an older step and later save that step afresh.
Only what a read touches is checked: there are no checksums, so a flipped byte inside an array file
that still decodes is not detected.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import multihost

from grpo_jax.checkpoint_guards import check_compatible, nonfinite_groups
from grpo_jax.orbax_adapters import (
    LatestAndBest,
    Manager,
    drop_abandoned_read_noise,
    json_args,
    quiet_abandoned_reads,
    quiet_read_only,
)
from grpo_jax.train_state import TrainState

FORMAT_VERSION = 1
_STATE_FIELDS = ("step", "params", "opt_state", "ref_params", "reward_params", "rng", "aux")
DAMAGED_SUFFIX = ".damaged"


class DamagedCheckpointError(ValueError):
    """A checkpoint folder that does not read cleanly: a file missing, truncated or not valid JSON.

    `step`, `directory` and `problem` (one line: the item and what is wrong) say which and why.
    """

    def __init__(self, step: int, directory: str | os.PathLike, problem: str):
        self.step, self.directory, self.problem = int(step), Path(directory), problem
        super().__init__(f"checkpoint step {self.step} in {self.directory} is damaged: {problem}")


# TensorStore status codes of a read that failed because of what is (not) on disk; others (e.g.
# UNAVAILABLE on a remote filesystem, INVALID_ARGUMENT for a shape mismatch) are not damage.
_DAMAGE_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION")


def _damage(error: BaseException, step_dir: Path) -> str | None:
    """One line saying what is wrong on disk if `error` (or an error it was raised from) comes from a
    missing, truncated or undecodable file; None if it is some other failure."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    for link in reversed(chain):  # the innermost error says most precisely what is wrong
        text = str(link.args[0]) if isinstance(link, KeyError) and link.args else str(link)
        if isinstance(link, FileNotFoundError):
            kind = "missing file"
        elif isinstance(link, (json.JSONDecodeError, UnicodeDecodeError)):
            kind = "not valid JSON"
        elif isinstance(link, KeyError) and "was not found in the checkpoint" in text:
            kind = "missing item"
        elif isinstance(link, ValueError) and text.startswith(_DAMAGE_CODES):
            kind = "unreadable"
        else:
            continue
        text = " ".join(text.replace(f"{step_dir}/", "").replace(str(step_dir), ".").split())
        text = text.split(" [tensorstore_spec=")[0][:300].rstrip(".")
        return f"{kind}: {text}"
    return None


def checkpoint_directory(workdir: str | os.PathLike) -> Path:
    """The checkpoint folder of a workdir (docs/CONTRACTS.md: `DIR/checkpoints/`)."""
    return Path(workdir) / "checkpoints"


# ----------------------------------------------------------------------------------------------------
# TrainState <-> nested dict of plain arrays
# ----------------------------------------------------------------------------------------------------


def _key_name(key) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _is_prng_key(leaf) -> bool:
    return jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _state_leaves(state: TrainState) -> list[tuple[str, Any]]:
    """(slash-joined path, leaf) for every array of the state, in pytree order.

    Each field is flattened on its own so the names do not depend on how flax orders dataclass fields.
    """
    named = []
    for field in _STATE_FIELDS:
        leaves, _ = jax.tree_util.tree_flatten_with_path(getattr(state, field))
        for path, leaf in leaves:
            named.append(("/".join((field, *(_key_name(k) for k in path))), leaf))
    return named


def _nest(named: list[tuple[str, Any]]) -> dict:
    tree: dict = {}
    for name, leaf in named:
        *parents, last = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf
    return tree


def _leaf_signature(leaf) -> dict:
    """Shape and dtype as saved on disk (typed keys are stored as their uint32 key data)."""
    if _is_prng_key(leaf):
        leaf = jax.eval_shape(jax.random.key_data, leaf)
    return {"shape": list(leaf.shape), "dtype": str(np.dtype(leaf.dtype))}


def _describe_state(state: TrainState) -> tuple[dict, dict]:
    """(nested dict of savable arrays, meta JSON) for a concrete TrainState."""
    named, prng_impls, signatures = [], {}, {}
    for name, leaf in _state_leaves(state):
        signatures[name] = _leaf_signature(leaf)
        if _is_prng_key(leaf):
            prng_impls[name] = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        named.append((name, leaf))
    meta = {"format_version": FORMAT_VERSION, "prng_impls": prng_impls, "leaves": signatures}
    return _nest(named), meta


# ----------------------------------------------------------------------------------------------------
# Checkpointer
# ----------------------------------------------------------------------------------------------------


class Checkpointer:
    """Orbax CheckpointManager for TrainStates: keeps the last `keep_last` steps plus the `keep_best` best.

    directory: the checkpoint folder itself (use `checkpoint_directory(workdir)` for `DIR/checkpoints`).
    best_metric / best_mode: which `metrics` entry ranks checkpoints and whether higher ("max") or lower
    ("min") is better. Checkpoints saved without that metric are kept or dropped by `keep_last` alone;
    the best `keep_best` checkpoints with it are never deleted. keep_best=0 disables best tracking.
    async_save: `save` returns once arrays are copied to host; the write continues in the background,
    so the caller may donate the state to the next step right away. The folder is created if missing.
    read_only: for readers next to a live run (evaluation, export): no folder is created, nothing is
    saved, and no `*.orbax-checkpoint-tmp-*` folder of a running save is cleaned up.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep_last: int = 3,
        keep_best: int = 1,
        best_metric: str = "eval/accuracy",
        best_mode: str = "max",
        async_save: bool = True,
        read_only: bool = False,
    ):
        if keep_last < 1:
            raise ValueError(f"Checkpointer keep_last must be >= 1 (the resume point), got {keep_last}")
        if keep_best < 0:
            raise ValueError(f"Checkpointer keep_best must be >= 0, got {keep_best}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"Checkpointer best_mode must be 'max' or 'min', got {best_mode!r}")
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        self.refused_saves = 0
        self._tracks_best = keep_best > 0
        self._best_mode = best_mode
        if read_only:
            with quiet_read_only():
                options = ocp.CheckpointManagerOptions(
                    read_only=True, create=False, best_fn=self._score if self._tracks_best else None
                )
        else:
            options = ocp.CheckpointManagerOptions(
                preservation_policy=LatestAndBest(
                    keep_last=keep_last, keep_best=keep_best, score=self._score
                ),
                # best_fn only makes orbax persist each step's metrics; ranking is by _score/LatestAndBest.
                best_fn=self._score if self._tracks_best else None,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
                create=True,
            )
        with quiet_read_only():
            self._manager = Manager(self.directory, options=options, item_names=("state", "extra", "meta"))
        self._read_only = read_only

    def _score(self, metrics: Mapping[str, Any] | None) -> float | None:
        """The ranking value of a checkpoint's saved metrics, higher is better; None when it has none."""
        if not metrics or self.best_metric not in metrics:
            return None
        value = float(metrics[self.best_metric])
        return value if self._best_mode == "max" else -value

    # -- queries -------------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None. Unfinished (tmp) folders are never counted."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best `best_metric` among checkpoints saved with it; None if there is none."""
        if not self._tracks_best:
            return None
        scored = [(self._score(self._manager.metrics(s)), s) for s in self.all_steps()]
        scored = [(score, s) for score, s in scored if score is not None]
        return max(scored)[1] if scored else None

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
            return steps[-1]
        if int(step) not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; available: {steps}")
        return int(step)

    def read_extra(self, step: int | None = None) -> dict:
        """The trainer's JSON `extra` of a checkpoint (latest if step is None), without loading arrays.

        Raises DamagedCheckpointError when the `extra` item is missing or not valid JSON.
        """
        step = self._resolve_step(step)
        return self._read_json(step, "extra")

    def _read_json(self, step: int, item: str) -> dict:
        saved = self._read(step, item, lambda: self._manager.restore(step, args=json_args(item))[item])
        if not isinstance(saved, Mapping):
            raise DamagedCheckpointError(step, self.directory, f"{item}: holds {type(saved).__name__}")
        return dict(saved)

    def _read(self, step: int, item: str, read):
        """`read()`, with an error that comes from what is on disk raised as DamagedCheckpointError."""
        drop_abandoned_read_noise()
        try:
            return read()
        except Exception as error:
            problem = _damage(error, self.directory / str(step))
            if problem is None:
                raise
        # Outside the except block, so the failed read's frames (and orbax's abandoned reads) are freed.
        quiet_abandoned_reads()
        raise DamagedCheckpointError(step, self.directory, f"{item}: {problem}")

    def set_aside(self, step: int) -> Path:
        """Move damaged checkpoint `step` to `<step>.damaged` (kept for inspection, never read again) so
        the run can fall back to an older step and save this step afresh; returns the new path."""
        if self._read_only:
            raise ValueError(f"a read-only Checkpointer does not move checkpoints (step {step})")
        target = self.directory / f"{int(step)}{DAMAGED_SUFFIX}"
        number = 1
        while target.exists():
            number += 1
            target = self.directory / f"{int(step)}{DAMAGED_SUFFIX}.{number}"
        if jax.process_index() == 0:
            os.replace(self.directory / str(int(step)), target)
        multihost.sync_global_processes(f"grpo_jax_set_aside_{int(step)}")
        self._manager.reload()
        return target

    def set_aside_folders(self) -> list[str]:
        """Names of the damaged checkpoints `set_aside` moved away in this folder."""
        if not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir() if DAMAGED_SUFFIX in p.name)

    # -- save ----------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: TrainState,
        *,
        extra: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Save `state` and the JSON-serialisable `extra` as checkpoint `step`; True if a save started.

        Returns False (and logs why) when the step already exists or, after a warning, when params,
        optimizer state or reference hold a non-finite value. `metrics` may carry `best_metric`; a
        missing or non-finite value just means this checkpoint does not compete for "best".
        """
        step = int(step)
        if step in self._manager.all_steps():
            logging.info(
                "checkpoint for step %d already exists in %s; not saving again", step, self.directory
            )
            return False
        bad = nonfinite_groups(state)
        if bad:
            self.refused_saves += 1
            logging.warning(
                "refusing to save checkpoint at step %d: non-finite values in %s (the last good checkpoint "
                "stays the resume point)",
                step,
                ", ".join(bad),
            )
            return False
        try:
            extra = json.loads(json.dumps(dict(extra), allow_nan=False))
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"checkpoint extra must be JSON-serialisable without NaN/inf: {error}"
            ) from error
        tree, meta = _describe_state(state)
        ranking = {} if self._tracks_best else None
        if self._tracks_best and metrics is not None and self.best_metric in metrics:
            value = float(np.asarray(jax.device_get(metrics[self.best_metric])))
            if math.isfinite(value):
                ranking = {self.best_metric: value}
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree),
                extra=ocp.args.JsonSave(extra),
                meta=ocp.args.JsonSave(meta),
            ),
            metrics=ranking,
            force=force,
        )

    # -- restore -------------------------------------------------------------------------------------

    def restore(
        self,
        state_template: TrainState,
        state_shardings: TrainState | None = None,
        step: int | None = None,
        *,
        fingerprint: Mapping[str, Any] | None = None,
    ) -> tuple[TrainState, dict]:
        """Restore checkpoint `step` (latest if None) into the structure of `state_template`.

        state_template: a TrainState of arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`);
        state_shardings: a TrainState of shardings like `create_train_state` returns; each array is read
        directly into its sharding. Without it, the template's own shardings are used (or one device).
        fingerprint: when given, compared to the saved `extra["fingerprint"]` before any array is read.
        Returns (state, extra). Raises FileNotFoundError when there is no such checkpoint, ValueError
        when the fingerprint or the state structure differ, and its subclass DamagedCheckpointError when
        a file of the checkpoint is missing, truncated or undecodable.
        """
        step = self._resolve_step(step)
        extra, meta = self._read_json(step, "extra"), self.read_meta(step)
        if fingerprint is not None:
            check_compatible(extra.get("fingerprint"), fingerprint, directory=self.directory)

        template_leaves = _state_leaves(state_template)
        self._check_structure(meta["leaves"], template_leaves, step)
        if state_shardings is not None:
            by_name = dict(_state_leaves_of_shardings(state_shardings))
            missing = [name for name, _ in template_leaves if name not in by_name]
            if missing:
                raise ValueError(
                    f"state_shardings has no sharding for {_summarise(missing)}; pass the shardings "
                    "returned with the state template"
                )
            sharding_leaves = [by_name[name] for name, _ in template_leaves]
        else:
            sharding_leaves = [getattr(leaf, "sharding", None) for _, leaf in template_leaves]

        default_sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        targets = []
        for (name, leaf), leaf_sharding in zip(template_leaves, sharding_leaves, strict=True):
            signature = _leaf_signature(leaf)
            targets.append(
                (
                    name,
                    jax.ShapeDtypeStruct(
                        tuple(signature["shape"]),
                        np.dtype(signature["dtype"]),
                        sharding=leaf_sharding or default_sharding,
                    ),
                )
            )
        restored = self._read(
            step,
            "state",
            lambda: self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_nest(targets)))
            )["state"],
        )

        values = []
        for name, _ in template_leaves:
            value = restored
            for part in name.split("/"):
                value = value[part]
            if name in meta["prng_impls"]:
                value = jax.random.wrap_key_data(value, impl=meta["prng_impls"][name])
            values.append(value)
        fields, start = {}, 0
        for field in _STATE_FIELDS:
            treedef = jax.tree_util.tree_structure(getattr(state_template, field))
            fields[field] = jax.tree_util.tree_unflatten(treedef, values[start : start + treedef.num_leaves])
            start += treedef.num_leaves
        return state_template.replace(**fields), extra

    def restore_params(
        self, params_template, param_shardings=None, step: int | None = None, *, fingerprint=None
    ):
        """Restore only the policy params of checkpoint `step` (latest if None), whatever the stage kind
        (optimizer state, reference, critic are never read): for evaluation, sampling and export.

        params_template: params pytree of arrays or ShapeDtypeStructs; param_shardings: matching
        shardings (default: the template's own, or one device). Returns (params, extra).
        """
        step = self._resolve_step(step)
        extra, meta = self._read_json(step, "extra"), self.read_meta(step)
        if fingerprint is not None:
            check_compatible(extra.get("fingerprint"), fingerprint, directory=self.directory)
        named, treedef = jax.tree_util.tree_flatten_with_path(params_template)
        names = ["/".join(("params", *(_key_name(k) for k in path))) for path, _ in named]
        saved_params = {k: v for k, v in meta["leaves"].items() if k.startswith("params/")}
        self._check_structure(saved_params, list(zip(names, [leaf for _, leaf in named], strict=True)), step)
        if param_shardings is None:
            shardings = [getattr(leaf, "sharding", None) for _, leaf in named]
        else:
            shardings = jax.tree_util.tree_leaves(
                param_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
            )
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        targets = [
            (name, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh or default))
            for name, (_, leaf), sh in zip(names, named, shardings, strict=True)
        ]
        tree = _nest(targets)
        restore_args = jax.tree_util.tree_map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), tree)
        with quiet_read_only():
            reader = Manager(
                self.directory,
                options=ocp.CheckpointManagerOptions(read_only=True, create=False),
                item_handlers={"state": ocp.PyTreeCheckpointHandler()},
            )
        try:
            restored = self._read(
                step,
                "state",
                lambda: reader.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.PyTreeRestore(tree, restore_args=restore_args, partial_restore=True)
                    ),
                )["state"],
            )
        finally:
            reader.close()
        values = []
        for name in names:
            value = restored
            for part in name.split("/"):
                value = value[part]
            values.append(value)
        return jax.tree_util.tree_unflatten(treedef, values), extra

    def read_meta(self, step: int) -> dict:
        """The `meta` JSON of checkpoint `step` (format version, PRNG implementations, the shape and dtype
        of every saved leaf); raises DamagedCheckpointError when it is missing or malformed."""
        meta = self._read_json(step, "meta")
        if not isinstance(meta.get("leaves"), Mapping) or not isinstance(meta.get("prng_impls"), Mapping):
            raise DamagedCheckpointError(step, self.directory, "meta: has no leaves/prng_impls")
        return meta

    def _check_structure(self, saved_leaves: Mapping[str, dict], template_leaves, step: int) -> None:
        expected = {name: _leaf_signature(leaf) for name, leaf in template_leaves}
        only_saved = sorted(set(saved_leaves) - set(expected))
        only_template = sorted(set(expected) - set(saved_leaves))
        changed = sorted(n for n in set(saved_leaves) & set(expected) if saved_leaves[n] != expected[n])
        problems = []
        if only_saved:
            problems.append(f"only the checkpoint has {_summarise(only_saved)}")
        if only_template:
            problems.append(f"only the current state has {_summarise(only_template)}")
        for name in changed[:3]:
            problems.append(f"{name} was {saved_leaves[name]}, now {expected[name]}")
        if problems:
            raise ValueError(
                f"checkpoint step {step} in {self.directory} does not match the current train state: "
                f"{'; '.join(problems)}; use a new --workdir or restore the config"
            )

    # -- lifecycle -----------------------------------------------------------------------------------

    def wait(self) -> None:
        """Block until background saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _state_leaves_of_shardings(shardings: TrainState) -> list[tuple[str, Any]]:
    """Like `_state_leaves` for a TrainState whose leaves are Sharding objects."""
    named = []
    for field in _STATE_FIELDS:
        leaves, _ = jax.tree_util.tree_flatten_with_path(
            getattr(shardings, field), is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
        )
        for path, leaf in leaves:
            named.append(("/".join((field, *(_key_name(k) for k in path))), leaf))
    return named


def _summarise(names: list[str]) -> str:
    groups = sorted({name.split("/")[0] for name in names})
    listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{listed} (in {', '.join(groups)})"
