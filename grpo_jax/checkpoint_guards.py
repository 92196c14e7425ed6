"""What a checkpoint save or restore refuses: a state holding a NaN or inf (`nonfinite_groups`; saving
it would only make a resume replay the divergence) and a checkpoint made under a different config
(`check_compatible`: one error naming every differing fingerprint field).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from grpo_jax.train_state import TrainState


@jax.jit
def _finite_flags(trees: dict) -> dict:
    """{group name: all floating leaves finite} as device scalars, one program per state structure."""

    def all_finite(tree):
        flags = [
            jnp.all(jnp.isfinite(x))
            for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)
        ]
        return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)

    return {name: all_finite(tree) for name, tree in trees.items()}


def nonfinite_groups(state: TrainState) -> list[str]:
    """Names of the state groups (params, opt_state, ref_params, aux) holding a NaN or inf; [] when clean."""
    flags = jax.device_get(
        _finite_flags(
            {
                "params": state.params,
                "opt_state": state.opt_state,
                "ref_params": state.ref_params,
                "aux": state.aux,
            }
        )
    )
    return [name for name, ok in flags.items() if not bool(ok)]


def check_compatible(
    saved_fingerprint: Mapping[str, Any] | None,
    current_fingerprint: Mapping[str, Any] | None,
    *,
    directory: str | os.PathLike | None = None,
) -> None:
    """Raise ONE ValueError naming every field where the checkpoint's fingerprint differs from the config.

    A fingerprint is a flat dict from the trainer (model shape fields, tokenizer vocab hash, ...); nested
    dicts are compared by dotted name. Fields present on only one side count as differences.
    """
    saved = _flatten_fingerprint(saved_fingerprint or {})
    current = _flatten_fingerprint(current_fingerprint or {})
    missing = object()
    differences = []
    for field in sorted(set(saved) | set(current)):
        old, new = saved.get(field, missing), current.get(field, missing)
        if old != new:
            old_text = f"no {field}" if old is missing else f"{field}={old!r}"
            new_text = "has no such field" if new is missing else f"says {new!r}"
            differences.append(f"{old_text}, the config now {new_text}")
    if differences:
        where = f"checkpoint in {directory}" if directory is not None else "checkpoint"
        raise ValueError(
            f"{where} was made with {'; '.join(differences)}; use a new --workdir or restore the config"
        )


def _flatten_fingerprint(fingerprint: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in fingerprint.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten_fingerprint(value, name + "."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat
