"""Dynamic sampling with refill (DAPO arXiv 2503.14476 §3.2; verl `algorithm.filter_groups`).

A group whose G rewards are all equal (all right or all wrong) has zero advantage: it adds no policy
gradient, only dilutes the batch. With `GRPOConfig.dynamic_sampling_refill` the `grpo` stage samples
`generation_batch_size(...)` prompts per generation round, keeps the groups whose rewards differ, and
samples further rounds (at most `refill_max_rounds` extra) until `prompts_per_step` such groups are in
hand. The step's batch keeps its static shape: the first `prompts_per_step` kept groups in round order;
a shortfall after the last round is filled with dropped groups marked `fill` (sample weight 0 in the
step, so they change no gradient), and surplus kept groups are discarded, as in DAPO and verl.

The pure part is here (`select_groups`, host numpy); `merge_rounds` assembles the fixed-size batch from
the rounds' device batches with one compiled program per round, whatever the number of rounds.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.sharding import BATCH_AXES


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which rollout groups make the step's batch.

    round_index, group_index: int [target]: the round and the group within it of each batch group, kept
      groups first (round order), then fill groups.
    fill: bool [target]: the group is a weight-0 filler (a dropped group standing in for a shortfall).
    kept, dropped, surplus: groups with signal in the batch, zero-variance groups seen, groups with
      signal sampled beyond the target and discarded.
    """

    round_index: np.ndarray
    group_index: np.ndarray
    fill: np.ndarray
    kept: int
    dropped: int
    surplus: int

    @property
    def shortfall(self) -> int:
        return int(self.fill.sum())


def generation_batch_size(prompts_per_step: int, oversample: float, data_parallel: int) -> int:
    """Prompts sampled per generation round: ceil(oversample × prompts_per_step), rounded up to a
    multiple of the data-parallel size (the sampler's batch is split over it)."""
    wanted = math.ceil(oversample * prompts_per_step - 1e-9)
    return max(data_parallel, math.ceil(wanted / data_parallel) * data_parallel)


def enough(zero_variance_rounds: list[np.ndarray], target: int) -> bool:
    """Whether the rounds so far hold `target` groups with signal."""
    return sum(int((~np.asarray(z, bool)).sum()) for z in zero_variance_rounds) >= target


def select_groups(zero_variance_rounds: list[np.ndarray], target: int) -> Selection:
    """The batch's `target` groups from the rounds' zero-variance flags (each bool [groups per round]):
    groups with signal in (round, group) order up to `target`, then, for a shortfall, zero-variance
    groups in the same order as weight-0 fill. Raises if the rounds hold fewer than `target` groups."""
    flags = [np.asarray(z, bool) for z in zero_variance_rounds]
    total = sum(len(z) for z in flags)
    if total < target:
        raise ValueError(f"the rounds hold {total} groups, fewer than the {target} the batch needs")
    order = [(r, g) for r, z in enumerate(flags) for g in range(len(z))]
    signal = [(r, g) for r, g in order if not flags[r][g]]
    zero = [(r, g) for r, g in order if flags[r][g]]
    kept = signal[:target]
    fill = zero[: target - len(kept)]
    chosen = kept + fill
    return Selection(
        round_index=np.asarray([r for r, _ in chosen], np.int32),
        group_index=np.asarray([g for _, g in chosen], np.int32),
        fill=np.asarray([False] * len(kept) + [True] * len(fill)),
        kept=len(kept),
        dropped=len(zero),
        surplus=len(signal) - len(kept),
    )


def row_indices(selection: Selection, round_: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows of round `round_`'s batch to take [target × G], which output rows come from it [target × G])
    for `merge_rounds`; rows a round does not supply point at its row 0 and are not taken."""
    from_round = selection.round_index == round_
    offsets = np.arange(group_size)
    rows = (selection.group_index[:, None] * group_size + offsets[None, :]).reshape(-1)
    take = np.repeat(from_round, group_size)
    return np.where(take, rows, 0).astype(np.int32), take


def make_merge(mesh=None):
    """(init, merge), jitted: `init(round_batch, fill)` -> a batch of zeros with the round batch's keys
    and trailing shapes, one row per entry of `fill` [rows] bool (kept as the batch's `fill` key), and
    `merge(acc, round_batch, rows, take)` -> acc whose rows where `take` is set become
    `round_batch[rows]`. One program each for every round (their shapes do not depend on it); with a
    mesh the result is laid out as a batch (rows over the data-parallel axes), on every process."""

    def laid_out(tree):
        if mesh is None:
            return tree

        def constrain(x):
            spec = jax.sharding.PartitionSpec(BATCH_AXES, *([None] * (x.ndim - 1)))
            return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))

        return jax.tree_util.tree_map(constrain, tree)

    def init(round_batch, fill):
        rows = fill.shape[0]
        acc = {k: jnp.zeros((rows, *v.shape[1:]), v.dtype) for k, v in round_batch.items()}
        return laid_out(dict(acc, fill=jnp.asarray(fill, bool)))

    def merge(acc, round_batch, rows, take):
        out = dict(acc)
        for key, x in round_batch.items():
            picked = jnp.take(x, rows, axis=0)
            out[key] = jnp.where(take.reshape((-1,) + (1,) * (x.ndim - 1)), picked, acc[key])
        return laid_out(out)

    return jax.jit(init), jax.jit(merge, donate_argnums=(0,))


def merge_rounds(init_merge, round_batches: list[dict], selection: Selection, group_size: int) -> dict:
    """The step's batch: the selected groups' rows of the rounds' batches (all with the same keys), in
    the selection's order, plus `fill` [target × G] bool. `init_merge`: `make_merge(mesh)`."""
    init, merge = init_merge
    acc = init(round_batches[0], np.repeat(selection.fill, group_size))
    for r, batch in enumerate(round_batches):
        if (selection.round_index == r).any():
            rows, take = row_indices(selection, r, group_size)
            acc = merge(acc, batch, rows, take)
    return acc
