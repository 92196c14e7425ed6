"""Rule rewards computed from token ids inside the jitted GRPO step.

Every reward here is a pure function of the rollout batch with static shapes:

    fn(batch, params=None) -> float32 [N]

`batch` holds `completion_tokens`/`completion_mask` int32 [N, L] (mask = 1 on generated tokens up to and
including the stop token), `truncated` bool [N], the gold answer `answer_tokens`/`answer_mask` int32
[N, A] (right-padded) and `prompt_tokens`/`prompt_mask` [N, P] (left-padded). Rule rewards ignore
`params`. No Python loop runs over tokens: spans are masks built from tag positions, variable-length
pieces are moved to the front with a stable cumsum-scatter ("compaction"), and per-vocabulary
properties (digit value, language) are lookup tables gathered by token id.

Tokenizer-specific ids live in `TokenSpec`, a small frozen dataclass built once by
`TokenSpec.from_tokenizer` (in `grpo_jax.rewards.vocabulary`, with the per-vocabulary language
classes). The "completion content" is every masked token except a final stop token.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.rewards.registry import register_reward
from grpo_jax.rewards.vocabulary import TokenSpec, VocabLanguageMask, language_vocab_mask

Batch = Mapping[str, jax.Array]

# ----------------------------------------------------------------------------------------------
# Static-shape building blocks
# ----------------------------------------------------------------------------------------------


def _isin(tokens: jax.Array, ids: tuple[int, ...]) -> jax.Array:
    if not ids:
        return jnp.zeros(tokens.shape, bool)
    return (tokens[..., None] == jnp.asarray(ids, tokens.dtype)).any(-1)


@functools.lru_cache(maxsize=16)
def _whitespace_table(spec: TokenSpec) -> np.ndarray:
    table = np.zeros(spec.vocab_size, bool)
    table[list(spec.whitespace_ids)] = True
    return table


def lookup(table: np.ndarray, tokens: jax.Array, fill_value=0) -> jax.Array:
    """Gather a per-vocabulary table [V, ...] by token id; ids outside [0, V) get `fill_value`."""
    return jnp.take(jnp.asarray(table), tokens, axis=0, mode="fill", fill_value=fill_value)


def is_whitespace(tokens: jax.Array, spec: TokenSpec) -> jax.Array:
    """Whitespace-only pieces, by table lookup (byte-level vocabularies have hundreds of them)."""
    return lookup(_whitespace_table(spec), tokens, fill_value=False)


def _first_position(hits: jax.Array) -> jax.Array:
    """hits [N, L] bool -> index of the first True per row, L when there is none. [N] int32"""
    length = hits.shape[-1]
    return jnp.where(hits.any(-1), jnp.argmax(hits, -1), length).astype(jnp.int32)


def compact(values: jax.Array, keep: jax.Array, width: int, fill: int = -1) -> tuple[jax.Array, jax.Array]:
    """Stable static-shape compaction: move values[keep] to the front of each row.

    values [N, L], keep [N, L] bool -> (compacted [N, width] with `fill` after the kept values,
    count [N]). Destinations come from a cumsum of `keep`; kept values past `width` are dropped
    (count still reports all of them).
    """
    dest = jnp.where(keep, jnp.cumsum(keep, axis=-1) - 1, width)

    def one_row(row, row_dest):
        return jnp.full((width,), fill, values.dtype).at[row_dest].set(row, mode="drop")

    return jax.vmap(one_row)(values, dest), keep.sum(-1).astype(jnp.int32)


def completion_lengths(batch: Batch) -> jax.Array:
    """|y|: generated tokens per completion, stop token included. [N] int32"""
    return batch["completion_mask"].astype(jnp.int32).sum(-1)


def _final_stop(batch: Batch, spec: TokenSpec) -> tuple[jax.Array, jax.Array]:
    """(position_is_final_stop [N, L] bool, stopped [N] bool): the last masked token is a stop id.

    `stopped` also requires `truncated` to be False.
    """
    tokens, mask = batch["completion_tokens"], batch["completion_mask"] > 0
    positions = jnp.arange(tokens.shape[-1])
    last = jnp.max(jnp.where(mask, positions, -1), axis=-1)
    last_token = jnp.take_along_axis(tokens, jnp.maximum(last, 0)[:, None], axis=-1)[:, 0]
    ends_with_stop = (last >= 0) & _isin(last_token, spec.stop_ids)
    at_stop = (positions[None] == last[:, None]) & ends_with_stop[:, None]
    truncated = batch.get("truncated")
    stopped = ends_with_stop if truncated is None else ends_with_stop & ~truncated.astype(bool)
    return at_stop, stopped


def completion_content(batch: Batch, spec: TokenSpec) -> jax.Array:
    """Generated tokens without the final stop token. [N, L] bool"""
    at_stop, _ = _final_stop(batch, spec)
    return (batch["completion_mask"] > 0) & ~at_stop


def tag_span(
    tokens: jax.Array, content: jax.Array, open_id: int, close_id: int
) -> tuple[jax.Array, jax.Array]:
    """Tokens strictly between the first `open_id` and the first `close_id` after it.

    tokens/content [N, L] -> (span [N, L] bool, found [N] bool: both tags present and ordered).
    """
    positions = jnp.arange(tokens.shape[-1])
    open_pos = _first_position((tokens == open_id) & content)
    close_pos = _first_position((tokens == close_id) & content & (positions[None] > open_pos[:, None]))
    found = close_pos < tokens.shape[-1]
    span = (
        content
        & (positions[None] > open_pos[:, None])
        & (positions[None] < close_pos[:, None])
        & found[:, None]
    )
    return span, found


# ----------------------------------------------------------------------------------------------
# Format (DeepSeek-R1)
# ----------------------------------------------------------------------------------------------


def format_reward(batch: Batch, spec: TokenSpec, *, require_stop: bool = True) -> jax.Array:
    """R1 format reward (arXiv 2501.12948 §2.2.2): 1.0 iff the content is exactly
    `ws* <think> X </think> ws* <answer> Y </answer> ws*` (ws = whitespace pieces; X, Y anything
    without tags, possibly empty) and, with `require_stop`, a stop token ended it (not truncated). [N]
    """
    tokens = batch["completion_tokens"]
    content = completion_content(batch, spec)
    hits = [(tokens == tag) & content for tag in spec.tag_ids]
    each_once = jnp.stack([h.sum(-1) == 1 for h in hits]).all(0)
    p0, p1, p2, p3 = (_first_position(h)[:, None] for h in hits)
    ordered = ((p0 < p1) & (p1 < p2) & (p2 < p3))[:, 0]
    positions = jnp.arange(tokens.shape[-1])[None]
    outside = (positions < p0) | ((positions > p1) & (positions < p2)) | (positions > p3)
    clean = ~(outside & content & ~is_whitespace(tokens, spec)).any(-1)
    ok = each_once & ordered & clean
    if require_stop:
        ok = ok & _final_stop(batch, spec)[1]
    return ok.astype(jnp.float32)


def format_partial_reward(batch: Batch, spec: TokenSpec) -> jax.Array:
    """Shaped format reward: 0.25 per well-placed tag, in [0, 1]. [N]

    Tag k is well placed iff it occurs exactly once in the content and, for every other tag j that also
    occurs exactly once, k comes before j exactly when k precedes j in <think> </think> <answer>
    </answer>. Text around the tags and the stop token are not checked (`format` does that).
    """
    tokens = batch["completion_tokens"]
    content = completion_content(batch, spec)
    hits = [(tokens == tag) & content for tag in spec.tag_ids]
    once = [h.sum(-1) == 1 for h in hits]
    pos = [_first_position(h) for h in hits]
    score = jnp.zeros(tokens.shape[0], jnp.float32)
    for k in range(4):
        placed = once[k]
        for j in range(4):
            if j != k:
                right_order = (pos[k] < pos[j]) if k < j else (pos[k] > pos[j])
                placed = placed & (~once[j] | right_order)
        score = score + 0.25 * placed
    return score


# ----------------------------------------------------------------------------------------------
# Accuracy: exact token match and integer value
# ----------------------------------------------------------------------------------------------


def _answer_span(batch: Batch, spec: TokenSpec) -> tuple[jax.Array, jax.Array]:
    """Non-whitespace tokens strictly inside the first <answer> ... </answer>. ([N, L] bool, found [N])"""
    tokens = batch["completion_tokens"]
    span, found = tag_span(tokens, completion_content(batch, spec), spec.answer_open, spec.answer_close)
    return span & ~is_whitespace(tokens, spec), found


def accuracy_reward(batch: Batch, spec: TokenSpec) -> jax.Array:
    """R1 rule accuracy by exact token match: 1.0 iff the answer span without whitespace pieces equals
    `answer_tokens` without whitespace pieces. An empty answer span never scores. [N]

    Token ids must match: "▁7" and "7" differ (use `accuracy_numeric` for integers).
    """
    answer_tokens = batch["answer_tokens"]
    width = answer_tokens.shape[-1]
    span, found = _answer_span(batch, spec)
    predicted, n_predicted = compact(batch["completion_tokens"], span, width)
    gold_keep = (batch["answer_mask"] > 0) & ~is_whitespace(answer_tokens, spec)
    gold, n_gold = compact(answer_tokens, gold_keep, width)
    ok = found & (n_predicted > 0) & (n_predicted == n_gold) & (predicted == gold).all(-1)
    return ok.astype(jnp.float32)


class _NumberTables(NamedTuple):
    digits: np.ndarray  # [V, K] int8: the digits of each number piece, left-aligned
    num_digits: np.ndarray  # [V] int8: 0 for a piece that is not a number
    is_minus: np.ndarray  # [V] bool


@functools.lru_cache(maxsize=16)
def _number_tables(spec: TokenSpec) -> _NumberTables:
    pieces = spec.number_pieces or tuple((i, str(d)) for d, i in enumerate(spec.digit_ids) if i >= 0)
    width = max([len(text) for _, text in pieces], default=1)
    digits = np.zeros((spec.vocab_size, width), np.int8)
    num_digits = np.zeros(spec.vocab_size, np.int8)
    for i, text in pieces:
        digits[i, : len(text)] = [int(c) for c in text]
        num_digits[i] = len(text)
    is_minus = np.zeros(spec.vocab_size, bool)
    for i in spec.minus_ids or (spec.minus_id,):
        if 0 <= i < spec.vocab_size:
            is_minus[i] = True
    return _NumberTables(digits, num_digits, is_minus)


def parse_integer(tokens: jax.Array, keep: jax.Array, tables: _NumberTables) -> tuple[jax.Array, ...]:
    """Parse `-? digit+` from the kept tokens of each row (whitespace must already be dropped).

    tokens/keep [N, L] -> (valid [N] bool, negative [N] bool, significant digits [N, L*K] int32
    (leading zeros stripped, -1 after the end), number of significant digits [N]). Values are never
    formed, so any length compares exactly (no int overflow). "-0" is zero, not negative.
    """
    n, length = tokens.shape
    width = length * tables.digits.shape[1]
    take = lambda table: lookup(table, tokens)
    num_digits = take(tables.num_digits).astype(jnp.int32)
    first = _first_position(keep)
    at_first = jnp.arange(length)[None] == first[:, None]
    has_sign = (take(tables.is_minus) & at_first & keep).any(-1)
    body = keep & ~(at_first & has_sign[:, None])
    valid = ~(body & (num_digits == 0)).any(-1) & body.any(-1)
    slots = jnp.arange(tables.digits.shape[1])
    keep_digit = (body[..., None] & (slots < num_digits[..., None])).reshape(n, width)
    digit_values = take(tables.digits).astype(jnp.int32).reshape(n, width)
    digits, count = compact(digit_values, keep_digit, width)
    leading_zeros = jnp.minimum(_first_position((digits != 0) & (digits >= 0)), count)
    significant = count - leading_zeros
    index = jnp.arange(width)[None] + leading_zeros[:, None]
    shifted = jnp.take_along_axis(digits, jnp.minimum(index, width - 1), axis=-1)
    shifted = jnp.where(jnp.arange(width)[None] < significant[:, None], shifted, -1)
    return valid, has_sign & (significant > 0), shifted, significant


def accuracy_numeric_reward(batch: Batch, spec: TokenSpec) -> jax.Array:
    """1.0 iff the answer span and `answer_tokens` both parse as integers (optional leading minus,
    digits, whitespace pieces ignored anywhere) with the same value: "007" == "7", "-3" != "3".
    Any other content in the span (letters, ".", ",") gives 0. Compares digit sequences with leading
    zeros stripped, so arbitrarily long numbers are exact. [N]
    """
    tables = _number_tables(spec)
    span, found = _answer_span(batch, spec)
    valid_p, neg_p, digits_p, len_p = parse_integer(batch["completion_tokens"], span, tables)
    answer_tokens = batch["answer_tokens"]
    gold_keep = (batch["answer_mask"] > 0) & ~is_whitespace(answer_tokens, spec)
    valid_g, neg_g, digits_g, len_g = parse_integer(answer_tokens, gold_keep, tables)
    width = min(digits_p.shape[-1], digits_g.shape[-1])
    same_digits = (digits_p[:, :width] == digits_g[:, :width]).all(-1)
    ok = found & valid_p & valid_g & (neg_p == neg_g) & (len_p == len_g) & same_digits
    return ok.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Language consistency, length shaping, toy rewards
# ----------------------------------------------------------------------------------------------


def language_consistency_reward(
    batch: Batch, spec: TokenSpec, vocab_mask: VocabLanguageMask, *, no_words_value: float = 0.0
) -> jax.Array:
    """R1 language-consistency reward (arXiv 2501.12948 §2.3.3): target-language tokens / countable
    tokens inside the first <think> ... </think>. 0 when there is no closed think span; `no_words_value`
    when the span has no countable (letter-bearing) token, e.g. a chain of digits and symbols, which
    mixes no language. [N]
    """
    tokens = batch["completion_tokens"]
    span, found = tag_span(tokens, completion_content(batch, spec), spec.think_open, spec.think_close)
    target = (lookup(vocab_mask.is_target, tokens, False) & span).sum(-1)
    countable = (lookup(vocab_mask.is_countable, tokens, False) & span).sum(-1)
    no_words = jnp.where(found, no_words_value, 0.0)
    return jnp.where(countable > 0, target / jnp.maximum(countable, 1), no_words).astype(jnp.float32)


def overlong_reward(batch: Batch, *, max_len: int, cache_len: int) -> jax.Array:
    """DAPO soft overlong punishment (arXiv 2503.14476 eq. 13), |y| = generated tokens incl. stop:
    0 if |y| <= L_max - L_cache; ((L_max - L_cache) - |y|) / L_cache up to L_max; -1 beyond. [N]
    """
    y = completion_lengths(batch).astype(jnp.float32)
    soft_start = max_len - cache_len
    ramp = (soft_start - y) / cache_len
    return jnp.where(y <= soft_start, 0.0, jnp.where(y <= max_len, ramp, -1.0)).astype(jnp.float32)


def length_penalty_reward(batch: Batch, *, max_len: int, coef: float = 1.0) -> jax.Array:
    """-coef * |y| / max_len. [N]"""
    return (-coef * completion_lengths(batch) / max_len).astype(jnp.float32)


def contains_token_reward(batch: Batch, *, token_id: int) -> jax.Array:
    """1.0 iff a generated token (stop token included) equals `token_id` (toy bandit reward). [N]"""
    hit = (batch["completion_tokens"] == token_id) & (batch["completion_mask"] > 0)
    return hit.any(-1).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Registered factories: make(token_spec, **kwargs) -> fn(batch, params=None) -> [N]
# ----------------------------------------------------------------------------------------------


@register_reward("format")
def make_format(spec: TokenSpec, *, require_stop: bool = True):
    return lambda batch, params=None: format_reward(batch, spec, require_stop=require_stop)


@register_reward("format_partial")
def make_format_partial(spec: TokenSpec):
    return lambda batch, params=None: format_partial_reward(batch, spec)


@register_reward("accuracy")
def make_accuracy(spec: TokenSpec):
    return lambda batch, params=None: accuracy_reward(batch, spec)


@register_reward("accuracy_numeric")
def make_accuracy_numeric(spec: TokenSpec):
    _number_tables(spec)  # build the digit tables now, not at first trace
    return lambda batch, params=None: accuracy_numeric_reward(batch, spec)


@register_reward("language_consistency")
def make_language_consistency(
    spec: TokenSpec,
    *,
    language: str = "latin",
    tokenizer: Any = None,
    vocab_mask: VocabLanguageMask | None = None,
    no_words_value: float = 0.0,
):
    """Needs `tokenizer` (the mask is computed here, once) or a precomputed `vocab_mask`."""
    if vocab_mask is None:
        if tokenizer is None:
            raise ValueError("reward 'language_consistency' needs tokenizer=... or vocab_mask=...")
        vocab_mask = language_vocab_mask(tokenizer, language)
    return lambda batch, params=None: language_consistency_reward(
        batch, spec, vocab_mask, no_words_value=no_words_value
    )


@register_reward("overlong")
def make_overlong(spec: TokenSpec, *, max_len: int, cache_len: int):
    if not 0 < cache_len <= max_len:
        raise ValueError(
            f"reward 'overlong': need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}"
        )
    return lambda batch, params=None: overlong_reward(batch, max_len=max_len, cache_len=cache_len)


@register_reward("length_penalty")
def make_length_penalty(spec: TokenSpec, *, max_len: int, coef: float = 1.0):
    if max_len <= 0:
        raise ValueError(f"reward 'length_penalty': max_len must be positive, got {max_len}")
    return lambda batch, params=None: length_penalty_reward(batch, max_len=max_len, coef=coef)


@register_reward("contains_token")
def make_contains_token(spec: TokenSpec, *, token_id: int):
    return lambda batch, params=None: contains_token_reward(batch, token_id=token_id)
