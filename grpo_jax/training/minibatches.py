"""Splitting a batch into minibatches, and forwards run one minibatch at a time.

A batch of N rows is split into M minibatches of N/M rows by interleaving (minibatch m holds rows m, m+M,
m+2M, ...), so every minibatch spreads over all data-parallel devices; with a prompt-major batch it also
keeps G/M samples of every prompt together in each minibatch (what shared-prefix training needs).
The RL steps (GRPO, PPO) run their inner updates over these minibatches, and their no-gradient forwards
before the update (reference logprobs, the trainer's π_old, the critic's values) over the same split
under `lax.map`, so the peak activation memory is that of N/M rows, not N.
"""

from __future__ import annotations

import jax

from grpo_jax.sharding import BATCH_AXES, data_parallel_size

# The batch keys a forward over prompt + completion reads.
FORWARD_KEYS = ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask")


def to_minibatches(tree, num_minibatches: int, mesh):
    """[N, ...] -> [M, N/M, ...] with minibatch m = rows m, m+M, m+2M, ...: every minibatch is spread
    over all data-parallel devices instead of living on a few of them."""

    def split(x):
        n = x.shape[0]
        y = x.reshape(n // num_minibatches, num_minibatches, *x.shape[1:]).swapaxes(0, 1)
        if mesh is not None:
            spec = jax.sharding.PartitionSpec(None, BATCH_AXES, *([None] * (x.ndim - 1)))
            if y.shape[1] % data_parallel_size(mesh) == 0:
                y = jax.lax.with_sharding_constraint(y, jax.sharding.NamedSharding(mesh, spec))
        return y

    return jax.tree_util.tree_map(split, tree)


def from_minibatches(x):
    """[M, N/M, ...] -> [N, ...]: the inverse of `to_minibatches`' interleaved split."""
    return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def map_minibatches(fn, params, batch: dict, num_minibatches: int, mesh=None, keys=FORWARD_KEYS):
    """`fn(params, minibatch)` -> [N/M, ...] over the M minibatches of `to_minibatches`, one at a time
    (`lax.map`), reassembled to [N, ...]: the forward's activations (and vocabulary-projection chunks) are
    those of N/M rows, not N. The no-gradient forwards before an RL update (reference logprobs, π_old,
    a critic's values) are the step's memory peak at scale otherwise (docs/SCALING.md). `fn` sees the
    `keys` of the batch for the rows of one minibatch (shared_prefix: G/M rows per prompt)."""
    batch = {k: batch[k] for k in keys}
    if num_minibatches == 1:
        return fn(params, batch)
    minibatches = to_minibatches(batch, num_minibatches, mesh)
    return jax.tree_util.tree_map(from_minibatches, jax.lax.map(lambda mb: fn(params, mb), minibatches))


def minibatch_logprobs(logprobs_fn, params, batch: dict, num_minibatches: int, mesh=None):
    """`logprobs_fn(params, minibatch)` [N/M, L] one minibatch at a time, reassembled to [N, L]
    (`map_minibatches` over the forward's keys)."""
    return map_minibatches(logprobs_fn, params, batch, num_minibatches, mesh)
