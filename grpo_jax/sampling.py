"""The jitted sampler: G completions per prompt with a KV cache, in one compiled program.

Each distinct prompt is prefilled ONCE and its KV cache fanned out to its G samples (shared prefix);
decoding is a `lax.while_loop` over a typed `SamplingState` that stops as soon as every sequence has
emitted a stop token or the budget is reached. Nothing loops over tokens in Python.

Output order: the G samples of prompt 0, then the G samples of prompt 1, ... (row `b * G + j` is sample
`j` of prompt `b`); the GRPO step's grouping relies on it.

Randomness: the random stream of a row is `fold_in(fold_in(rng, hash(prompt tokens)), j)`; decode step
t draws two uniforms from `fold_in(row key, t)` and turns them into a token by inverting the CDF of the
(truncated) softmax. A sample therefore depends on (rng, prompt content, sample index, step) and not on
the prompt's row: permuting the prompts permutes the rollouts and changes nothing else. (Two identical
prompts in one batch therefore receive identical samples.) `rng` is a typed key (`jax.random.key`) or
a raw one (`jax.random.PRNGKey`); the two spellings of one key give identical rollouts.

Logprobs: `logprobs` are log softmax(logits / temperature) of the sampled token — exactly what the
training forward computes for the same tokens at the same temperature, so GRPO can use them as π_old
with no importance correction, also where `min_new_tokens` kept the stop tokens from being drawn. With
top-k/top-p truncation or that stop mask, `sampling_logprobs` gives the log-prob under the truncated,
masked, renormalised distribution actually sampled from. Greedy (`temperature=0`) reports logprobs at
temperature 1.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp

from grpo_jax.inputs import as_key
from grpo_jax.models import (
    ModelConfig,
    activation_sharding,
    completion_logprobs,
    forward_with_cache,
    init_cache,
    positions_from_mask,
)
from grpo_jax.sharding import BATCH_AXES, data_parallel_size

_NEG_INF = -1e30


@flax.struct.dataclass
class Rollout:
    """G completions per prompt. N = B * G rows, L = max_new_tokens, P = prompt length.

    tokens [N, L] int32 (pad after the stop token); logprobs / sampling_logprobs [N, L] float32 (0 where
    mask is 0); mask [N, L] int32 (1 on generated tokens up to and including the stop token);
    lengths [N] int32; truncated [N] bool (no stop token within the budget); prompt_tokens [N, P] and
    prompt_mask [N, P] (each prompt repeated per sample); num_steps: decode steps actually run.
    loss_mask [N, L] int32 or None: multi-turn rollouts (`grpo_jax.rollout.turns`) only, 1 on the tokens
    the policy drew, 0 on observation tokens inside `mask` (part of the sequence, not of the loss); None:
    `mask` is the loss mask.
    """

    tokens: jax.Array
    logprobs: jax.Array
    sampling_logprobs: jax.Array
    mask: jax.Array
    lengths: jax.Array
    truncated: jax.Array
    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    num_steps: jax.Array
    loss_mask: jax.Array | None = None


@flax.struct.dataclass
class SamplingState:
    """Loop state. `step` = tokens generated so far; `logits` [N, V] predict token `step`."""

    step: jax.Array
    done: jax.Array  # [N] bool
    tokens: jax.Array  # [N, L]
    logprobs: jax.Array  # [N, L]
    sampling_logprobs: jax.Array  # [N, L]
    mask: jax.Array  # [N, L]
    logits: jax.Array  # [N, V]
    cache: dict  # {"k", "v"}: [layers, N, P + L, kv_heads, head_dim]
    key_mask: jax.Array  # [N, P + L]
    row_keys: jax.Array  # [N] PRNG keys


def truncate_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Mask logits [..., V] outside the top-k set and outside the nucleus (smallest set with mass >= top_p,
    Holtzman et al. 2019 arXiv 1904.09751). The most likely token is always kept."""
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, _NEG_INF, logits)
    if top_p < 1.0:
        logits = jnp.where(_order_keys(logits) < _nucleus_key(logits, top_p), _NEG_INF, logits)
    return logits


def _order_keys(x: jax.Array) -> jax.Array:
    """int32 keys ordered as the float32 values of x (no NaN): a comparison of keys is one of values
    (-0.0 and +0.0 get the same key)."""
    x = x.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _nucleus_key(logits: jax.Array, top_p: float) -> jax.Array:
    """[..., 1]: the smallest order key k whose tokens above it (key > k) hold probability mass < top_p.

    The nucleus is then exactly the tokens with key >= k: a token is in it iff the mass of the tokens
    strictly more likely than it is below top_p, which is the sorted-cumsum rule (ties kept together).
    Found by bisection over the 2^32 keys (32 masked sums over V) instead of sorting every row, which is
    far cheaper at large V (measured by `benchmarks/benchmark_decode.py`, the `choice_*_top_p` rows)."""
    keys = _order_keys(logits)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    high = jnp.max(keys, axis=-1, keepdims=True)  # mass above the top token: 0 < top_p
    low = jnp.min(keys, axis=-1, keepdims=True) - 1  # mass above: 1 >= top_p

    def halve(_, bounds):
        low, high = bounds
        middle = (low >> 1) + (high >> 1) + (low & high & 1)  # floor((low + high) / 2), no overflow
        small = jnp.sum(jnp.where(keys > middle, probs, 0.0), axis=-1, keepdims=True) < top_p
        return jnp.where(small, low, middle), jnp.where(small, middle, high)

    return jax.lax.fori_loop(0, 32, halve, (low, high))[1]


def _prompt_hash(prompt_tokens: jax.Array, prompt_mask: jax.Array) -> jax.Array:
    """A content hash [B] of each prompt's real tokens (independent of left padding)."""
    tokens = jnp.where(prompt_mask > 0, prompt_tokens, 0).astype(jnp.uint32)
    positions = positions_from_mask(prompt_mask).astype(jnp.uint32)
    mixed = (tokens + jnp.uint32(0x9E3779B9)) * (positions * jnp.uint32(2654435761) + jnp.uint32(1))
    mixed = jnp.where(prompt_mask > 0, mixed ^ (mixed >> 15), 0)
    return jnp.sum(mixed * jnp.uint32(0x85EBCA6B), axis=-1, dtype=jnp.uint32)


def sample_keys(rng: jax.Array, prompt_tokens: jax.Array, prompt_mask: jax.Array, num_samples: int):
    """Every row's random stream, keys [B * G] (prompt-major): `fold_in(fold_in(rng, hash(prompt)), j)`."""
    prompt_keys = jax.vmap(lambda h: jax.random.fold_in(rng, h))(_prompt_hash(prompt_tokens, prompt_mask))
    row_keys = jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(jnp.arange(num_samples)))
    return row_keys(prompt_keys).reshape(-1)


def _block_size(vocab_size: int) -> int:
    """Tokens per block of the two-level inverse CDF: the power of two nearest above sqrt(V)."""
    return 1 << max(math.ceil(math.log2(max(vocab_size, 1)) / 2), 0)


def inverse_cdf_sample(probs: jax.Array, uniforms: jax.Array) -> jax.Array:
    """Draw one token per row of `probs` [N, V] (non-negative, any total) from `uniforms` [N, 2] in [0, 1).

    Two-level inverse CDF: the first uniform picks a block of ~sqrt(V) tokens by the cumulative block
    masses, the second picks a token inside it by that block's own cumulative sum. P(token) is
    P(block) · P(token | block) = p / total, as with one flat cumsum, but every cumulative sum runs over
    ~sqrt(V) terms of comparable size, so float32 rounding does not swallow small probabilities the
    way a flat cumsum over a 150k vocabulary near 1.0 would (spacing 6e-8). A zero-probability token
    (outside top-k/top-p, a forbidden stop token) is never returned: where rounding would pick one,
    the largest entry of the block (or the heaviest block) is taken instead.
    """
    n, vocab = probs.shape
    block = _block_size(vocab)
    num_blocks = -(-vocab // block)
    blocks = jnp.pad(probs, ((0, 0), (0, num_blocks * block - vocab))).reshape(n, num_blocks, block)
    masses = jnp.sum(blocks, axis=-1)  # [N, num_blocks]

    def pick(weights, u):
        """Index i with cdf[i-1] <= u * total < cdf[i], never one of zero weight: [N]."""
        cdf = jnp.cumsum(weights, axis=-1)
        index = jnp.sum(cdf <= u[:, None] * cdf[:, -1:], axis=-1)
        index = jnp.minimum(index, weights.shape[-1] - 1)
        chosen = jnp.take_along_axis(weights, index[:, None], axis=-1)[:, 0]
        return jnp.where(chosen > 0, index, jnp.argmax(weights, axis=-1))

    block_index = pick(masses, uniforms[:, 0])
    in_block = jnp.take_along_axis(blocks, block_index[:, None, None], axis=1)[:, 0]  # [N, block]
    return block_index * block + pick(in_block, uniforms[:, 1])


def choose_tokens(
    logits: jax.Array,
    row_keys: jax.Array,
    step,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    min_new_tokens: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The sampler's token choice at decode step `step` (traceable; the sampler calls it inside its loop).

    logits [N, V] float32, row_keys [N] typed PRNG keys (one stream per row), step a scalar or [N] (each
    row's own token index: the rollout engine's rows are at different steps). Returns (token [N] int32,
    logprob [N], sampling_logprob [N]). `temperature=0` is argmax (logprob at temperature 1,
    sampling_logprob 0); before `min_new_tokens` the `stop_ids` cannot be chosen.

    Which distribution each reports (docs/ALGORITHMS.md, "Which logprobs are which"): `logprob` is the
    policy's, log softmax(logits / temperature) over the FULL vocabulary, before the `min_new_tokens` stop
    mask and top-k/top-p truncation, exactly what the training forward computes, so it serves as π_old;
    `sampling_logprob` is the log-prob under the distribution really sampled from (stop tokens masked,
    truncated, renormalised): π_sampler of the mismatch correction.

    Sampling draws two uniforms per row from `fold_in(row_key, step)` and inverts the CDF of the
    (truncated) softmax (`inverse_cdf_sample`): the distribution of `jax.random.categorical` without
    its V Gumbel draws per row (on a CPU those were half of a decode step).
    """
    vocab = logits.shape[-1]
    policy_logits = logits
    steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), logits.shape[:1])  # [N]: one step per row
    if min_new_tokens:
        is_stop = jnp.isin(jnp.arange(vocab), jnp.asarray(stop_ids))
        logits = jnp.where(is_stop & (steps[:, None] < min_new_tokens), _NEG_INF, logits)
    if temperature == 0.0:
        token = jnp.argmax(logits, axis=-1)
        logp_all = jax.nn.log_softmax(policy_logits, axis=-1)
        sampling_logp = jnp.zeros(token.shape, jnp.float32)
    else:
        logp_all = jax.nn.log_softmax(policy_logits / temperature, axis=-1)
        scaled = logits / temperature
        if (top_k and top_k < vocab) or top_p < 1.0:
            sampling_logp_all = jax.nn.log_softmax(truncate_logits(scaled, top_k=top_k, top_p=top_p), axis=-1)
        elif min_new_tokens:
            sampling_logp_all = jax.nn.log_softmax(scaled, axis=-1)
        else:
            sampling_logp_all = logp_all
        uniforms = jax.vmap(lambda k, t: jax.random.uniform(jax.random.fold_in(k, t), (2,)))(row_keys, steps)
        token = inverse_cdf_sample(jnp.exp(sampling_logp_all), uniforms)
        sampling_logp = jnp.take_along_axis(sampling_logp_all, token[:, None], axis=-1)[:, 0]
    logp = jnp.take_along_axis(logp_all, token[:, None], axis=-1)[:, 0]
    return token.astype(jnp.int32), logp, sampling_logp


def _constrain_rows(x, mesh, axis):
    """Shard dimension `axis` of x over the batch axes when a mesh is given and it divides."""
    if mesh is None:
        return x
    if x.shape[axis] % data_parallel_size(mesh):
        return x
    spec = [None] * x.ndim
    spec[axis] = BATCH_AXES
    return jax.lax.with_sharding_constraint(
        x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
    )


def _constrain_cache(cache, mesh):
    """Pin the KV cache {"k", "v"} [L, B, S, K, Dh]: rows B over the batch axes and KV heads K over
    `tensor` (where they divide), the layout of the tensor-parallel k/v projections that write it.
    Without it XLA kept every KV head on every tensor chip: the cache per chip was `tensor` times larger
    (docs/SCALING.md)."""
    if mesh is None:
        return cache
    data_parallel = data_parallel_size(mesh)

    def constrain(c):
        rows = BATCH_AXES if c.shape[1] % data_parallel == 0 else None
        heads = "tensor" if c.shape[3] % mesh.shape["tensor"] == 0 else None
        spec = jax.sharding.PartitionSpec(None, rows, None, heads, None)
        return jax.lax.with_sharding_constraint(c, jax.sharding.NamedSharding(mesh, spec))

    return jax.tree_util.tree_map(constrain, cache)


def _generate_body(
    model_config,
    params,
    prompt_tokens,
    prompt_mask,
    rng,
    *,
    num_samples,
    max_new_tokens,
    temperature,
    top_p,
    top_k,
    stop_ids,
    min_new_tokens,
    pad_id,
    mesh,
):
    batch, prompt_len = prompt_tokens.shape
    n, total = batch * num_samples, prompt_len + max_new_tokens
    prompt_mask = prompt_mask.astype(jnp.int32)

    # Prefill each distinct prompt once, then fan its cache out to its G samples.
    key_mask = jnp.pad(prompt_mask, ((0, 0), (0, max_new_tokens)))
    cache = init_cache(model_config, batch, total)
    logits, cache = forward_with_cache(
        model_config,
        params,
        prompt_tokens,
        positions_from_mask(prompt_mask),
        cache,
        0,
        key_mask,
        last_only=True,
    )
    fan_out = lambda x, axis: _constrain_rows(jnp.repeat(x, num_samples, axis=axis), mesh, axis)
    cache = _constrain_cache(
        jax.tree_util.tree_map(lambda c: jnp.repeat(c, num_samples, axis=1), cache), mesh
    )
    key_mask = fan_out(key_mask, 0)
    last_logits = fan_out(logits[:, -1], 0)
    prompt_lengths = jnp.sum(prompt_mask, axis=-1)
    next_position = fan_out(prompt_lengths, 0)

    row_keys = sample_keys(rng, prompt_tokens, prompt_mask, num_samples)

    choose = functools.partial(
        choose_tokens,
        stop_ids=stop_ids,
        min_new_tokens=min_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    stop_ids_arr = jnp.asarray(stop_ids, jnp.int32)

    def record(state: SamplingState) -> SamplingState:
        """Sample token `state.step` from `state.logits` and write it (pad once a row is done)."""
        token, logp, sampling_logp = choose(state.logits, state.row_keys, state.step)
        live = ~state.done
        token = jnp.where(live, token, pad_id)
        column = lambda buf, value: jax.lax.dynamic_update_slice_in_dim(
            buf, value[:, None], state.step, axis=1
        )
        return state.replace(
            tokens=column(state.tokens, token),
            logprobs=column(state.logprobs, jnp.where(live, logp, 0.0)),
            sampling_logprobs=column(state.sampling_logprobs, jnp.where(live, sampling_logp, 0.0)),
            mask=column(state.mask, live.astype(jnp.int32)),
            done=state.done | (live & jnp.isin(token, stop_ids_arr)),
            step=state.step + 1,
        )

    def decode_one(state: SamplingState) -> SamplingState:
        """Feed the last sampled token through the cache, then sample the next one."""
        last = jax.lax.dynamic_slice_in_dim(state.tokens, state.step - 1, 1, axis=1)
        slot = prompt_len + state.step - 1
        key_mask = jax.lax.dynamic_update_slice_in_dim(
            state.key_mask, jnp.ones((n, 1), jnp.int32), slot, axis=1
        )
        positions = (next_position + state.step - 1)[:, None]
        logits, cache = forward_with_cache(model_config, params, last, positions, state.cache, slot, key_mask)
        cache = _constrain_cache(cache, mesh)
        return record(state.replace(logits=logits[:, 0], cache=cache, key_mask=key_mask))

    zeros = jnp.zeros((n, max_new_tokens), jnp.float32)
    state = SamplingState(
        step=jnp.asarray(0, jnp.int32),
        done=jnp.zeros((n,), bool),
        tokens=jnp.full((n, max_new_tokens), pad_id, jnp.int32),
        logprobs=zeros,
        sampling_logprobs=zeros,
        mask=jnp.zeros((n, max_new_tokens), jnp.int32),
        logits=last_logits,
        cache=cache,
        key_mask=key_mask,
        row_keys=row_keys,
    )
    state = record(state)
    state = jax.lax.while_loop(lambda s: (s.step < max_new_tokens) & ~jnp.all(s.done), decode_one, state)
    return Rollout(
        tokens=state.tokens,
        logprobs=state.logprobs,
        sampling_logprobs=state.sampling_logprobs,
        mask=state.mask,
        lengths=jnp.sum(state.mask, axis=-1),
        truncated=~state.done,
        prompt_tokens=jnp.repeat(prompt_tokens, num_samples, axis=0),
        prompt_mask=jnp.repeat(prompt_mask, num_samples, axis=0),
        num_steps=state.step,
    )


# The compile-time arguments of a sampler's jitted program (the rollout engine adds its own to these).
STATIC_ARGNAMES = (
    "model_config",
    "num_samples",
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop_ids",
    "min_new_tokens",
    "pad_id",
    "mesh",
)


def static_settings(
    *, num_samples, max_new_tokens, temperature, top_p, top_k, eos_id, stop_ids, min_new_tokens, pad_id
) -> dict:
    """`generate`'s sampling arguments checked (one line naming the bad ones) and made hashable and
    canonical (Python ints and floats, the stop ids sorted with `eos_id` among them), as the jitted
    program's static arguments: the same settings always hit the same compiled program."""
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"num_samples and max_new_tokens must be >= 1, got {num_samples}, {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling settings: temperature={temperature}, top_p={top_p}, top_k={top_k}")
    return dict(
        num_samples=int(num_samples),
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
        stop_ids=tuple(sorted({int(eos_id), *(int(s) for s in stop_ids)})),
        min_new_tokens=int(min_new_tokens),
        pad_id=int(pad_id),
    )


@functools.partial(jax.jit, static_argnames=STATIC_ARGNAMES)
def _generate(model_config, params, prompt_tokens, prompt_mask, rng, *, mesh, **static):
    """The jitted sampler: `_generate_body` traced with the activation layout pinned to the mesh."""
    with activation_sharding(mesh):
        return _generate_body(model_config, params, prompt_tokens, prompt_mask, rng, mesh=mesh, **static)


def generate(
    model_config: ModelConfig,
    params,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array,
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_id: int,
    stop_ids: Sequence[int] = (),
    min_new_tokens: int = 0,
    pad_id: int = 0,
    mesh=None,
) -> Rollout:
    """Sample `num_samples` completions for each left-padded prompt (docs/CONTRACTS.md).

    prompt_tokens/prompt_mask [B, P] (left-padded); rng: a typed or raw PRNG key. Returns a `Rollout`
    with N = B * num_samples rows in prompt-major order. `eos_id` and any `stop_ids` end a sequence (the
    stop token is included in the mask); `min_new_tokens` forbids stopping earlier; `temperature=0.0` is
    greedy. Pass the `mesh` to pin the fanned-out KV cache and rows to the ("data", "fsdp") axes. One
    compilation per distinct set of static arguments and shapes.
    """
    rng = as_key(rng, "generate(rng)")
    settings = static_settings(
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        eos_id=eos_id,
        stop_ids=stop_ids,
        min_new_tokens=min_new_tokens,
        pad_id=pad_id,
    )
    return _generate(
        model_config,
        params,
        jnp.asarray(prompt_tokens, jnp.int32),
        jnp.asarray(prompt_mask),
        rng,
        mesh=mesh,
        **settings,
    )


def rollout_logprobs(model_config: ModelConfig, params, rollout: Rollout, *, temperature: float = 1.0):
    """Recompute the logprobs of a rollout's tokens with the training forward: [N, L] (0 off-mask).

    This is the π_θ(o_t | q, o_<t) of the GRPO loss; on fresh params it equals `rollout.logprobs`.
    """
    logp = completion_logprobs(
        model_config,
        params,
        rollout.prompt_tokens,
        rollout.prompt_mask,
        rollout.tokens,
        rollout.mask,
        temperature=temperature or 1.0,
    )
    return jnp.where(rollout.mask > 0, logp, 0.0)
