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

The R1 tags (`find_tags`) are read from the text the tokens spell, whatever the tokenizer:
  * A tag the tokenizer always keeps as one token (a SentencePiece user-defined symbol, an added
    token) is matched by that id only, as before: a model that spells it out in pieces has not written
    the tag (the tokenizer never encodes it so).
  * Any other tag (byte-level BPE such as Qwen2.5's splits "<answer>" into "<", "answer", ">", and in
    context merges neighbours into the edge pieces: " <", ".</", "><", ">\\n", ">-" ...) is matched
    as EVERY token sequence that spells it, not a list of encodings seen in sample contexts: a
    "head" piece whose text ends with the tag's first a characters (any text before them), "middle"
    pieces that are exactly the next characters, and a "tail" piece that starts with the tag's last
    characters (any text after them); or one piece that holds the whole tag. Each piece's relation to
    each tag is a table row built once on the host (`vocabulary.tag_tables`, by scanning every piece's
    decoded text); in-graph, a bitmask of "characters spelled so far" is carried across at most
    len(tag) shifted copies of the completion (a sliding window of static size, vectorised over
    [N, L]), so a sequence the model spells in any split is found, as the host's regex finds it in
    the decoded text.
  * Positions are character keys `token_index * stride + offset_in_piece`, so the order of two tags
    that share a piece ("><" ends </think> and starts <answer>) is exact.
  * Characters that an edge piece carries besides the tag belong to the text next to the tag, as in
    the decoded text: `format` requires them to be whitespace where the tag stands outside <think>/
    <answer> (" <think>" and "\\n<answer>" pass, ".<answer>" after </think> fails); the accuracy
    rewards score 0 when they are non-whitespace text inside <answer> ("42.</" as pieces "42", ".</":
    the answer "42." is not an integer, exactly as with pieces "42", ".", "</"), except a "-" right
    after <answer> in its last piece (Qwen2.5 has ">-"), which `accuracy_numeric` reads as the sign;
    `language_consistency` counts only the tokens wholly inside <think>.
Tags matched as sequences must have their first and last characters nowhere else in any tag (true of
"<" and ">" in the R1 tags), so occurrences never overlap and each piece fits a tag's edge one way only.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.rewards.registry import register_reward
from grpo_jax.rewards.vocabulary import (
    MAX_TAG_CHARS,
    TagTables,
    TokenSpec,
    VocabLanguageMask,
    language_vocab_mask,
    tag_tables,
)

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


# ----------------------------------------------------------------------------------------------
# R1 tags in the token stream (see the module docstring)
# ----------------------------------------------------------------------------------------------

_NO_CHAR = np.iinfo(np.int32).max  # the key of a character that is not there


class TagMatch(NamedTuple):
    """The occurrences of one tag in the content. Keys are `token_index * stride + offset_in_piece`.

    count [N] int32; first_begin/first_end [N] int32: keys of the first occurrence's first and last
    characters (`_NO_CHAR` when there is none); begins [N, L, 2] int32: the key of the first character of
    the occurrence that starts in each token, as a whole piece's part or as a head (`_NO_CHAR` if none).
    """

    count: jax.Array
    begins: jax.Array
    first_begin: jax.Array
    first_end: jax.Array

    def first_begin_after(self, key: jax.Array) -> jax.Array:
        """[N] key of the first occurrence that begins after character `key` [N]."""
        later = jnp.where(self.begins > key[:, None, None], self.begins, _NO_CHAR)
        return later.min(axis=(1, 2))


class Tags(NamedTuple):
    """The four tags found in a batch, with what `text_between` needs. rows/content/nonspace: [N, L]."""

    matches: tuple[TagMatch, TagMatch, TagMatch, TagMatch]
    rows: jax.Array
    content: jax.Array
    nonspace: jax.Array  # non-whitespace characters of each content token (>= 1 for a non-space piece)
    tables: TagTables


def _shift_left(x: jax.Array, by: int, fill) -> jax.Array:
    """x[:, i + by] at position i, `fill` past the end. [N, L]"""
    return jnp.concatenate([x[:, by:], jnp.full((x.shape[0], by), fill, x.dtype)], axis=1)


def _match_tag(rows: jax.Array, content: jax.Array, tables: TagTables, k: int, size: int, sequence: bool):
    """Occurrences of tag k (`size` characters) in the content tokens, by their pieces' table rows."""
    stride = tables.stride
    table = lambda name: jnp.asarray(getattr(tables, name)[:, k])
    starts = jnp.arange(rows.shape[-1], dtype=jnp.int32)[None] * stride
    whole = jnp.where(content, table("whole")[rows], 0)
    whole_begin = jnp.where(whole > 0, starts + table("whole_offset")[rows], _NO_CHAR)
    whole_end = jnp.where(whole > 0, whole_begin + size - 1, _NO_CHAR)
    count, first_end = whole.sum(-1), whole_end.min(-1)
    head_begin = jnp.full(rows.shape, _NO_CHAR, jnp.int32)
    if sequence:  # head, middles, tail: at most `size` tokens, one character each at least
        piece_length = jnp.asarray(tables.length)
        head, length = table("head")[rows], piece_length[rows]
        state = jnp.where(content & (head > 0), jnp.left_shift(1, head), 0)  # bit a: a characters spelled
        started = jnp.zeros(rows.shape, bool)
        for offset in range(1, size):
            next_rows, next_content = _shift_left(rows, offset, 0), _shift_left(content, offset, False)
            tail = table("tail")[next_rows]
            done = next_content & (tail > 0) & (jnp.right_shift(state, size - tail) & 1 > 0)
            started = started | done
            end = starts + offset * stride + tail - 1
            first_end = jnp.minimum(first_end, jnp.where(done, end, _NO_CHAR).min(-1))
            spelled = jnp.left_shift(state & table("middle")[next_rows], piece_length[next_rows])
            state = jnp.where(next_content, spelled, 0)
        count = count + started.sum(-1)
        head_begin = jnp.where(started, starts + length - head, _NO_CHAR)
    begins = jnp.stack([whole_begin, head_begin], axis=-1).astype(jnp.int32)
    return TagMatch(count.astype(jnp.int32), begins, begins.min(axis=(1, 2)), first_end.astype(jnp.int32))


def find_tags(batch: Batch, spec: TokenSpec) -> Tags:
    """Every occurrence of the four tags in the completion content (static shapes, no loop over tokens)."""
    tokens = batch["completion_tokens"]
    tables = tag_tables(spec)
    if (tokens.shape[-1] + MAX_TAG_CHARS + 1) * tables.stride >= _NO_CHAR:
        raise ValueError(f"completions of {tokens.shape[-1]} tokens are too long for int32 character keys")
    content = completion_content(batch, spec)
    rows = lookup(tables.row, tokens)
    matches = tuple(
        _match_tag(rows, content, tables, k, len(tag), spec.tag_ids[k] == -1)
        for k, tag in enumerate(spec.tag_texts)
    )
    piece_nonspace = jnp.asarray(tables.nonspace_before)[rows, jnp.asarray(tables.length)[rows]]
    nonspace = jnp.where(rows > 0, piece_nonspace, ~is_whitespace(tokens, spec))
    return Tags(matches, rows, content, jnp.where(content, nonspace, 0), tables)


def text_between(tags: Tags, after: jax.Array, before: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Non-whitespace characters strictly between character keys `after` < `before` [N] (-1: from the
    start; `_NO_CHAR`: to the end) -> (all of them [N], those inside the two boundary tokens [N])."""
    stride, length = tags.tables.stride, tags.rows.shape[-1]
    cumulative = jnp.asarray(tags.tables.nonspace_before)
    first_token = jnp.where(after < 0, -1, after // stride)
    last_token = jnp.minimum(before // stride, length)
    positions = jnp.arange(length)[None]
    inner = (positions > first_token[:, None]) & (positions < last_token[:, None])
    whole_tokens = jnp.where(inner, tags.nonspace, 0).sum(-1)

    def row_at(token):
        return jnp.take_along_axis(tags.rows, jnp.clip(token, 0, length - 1)[:, None], axis=-1)[:, 0]

    def nonspace_before(row, offset):
        return cumulative[row, jnp.clip(offset, 0, cumulative.shape[-1] - 1)]

    row_a, row_b = row_at(first_token), row_at(last_token)
    after_a = nonspace_before(row_a, after % stride + 1)
    tail_of_a = nonspace_before(row_a, jnp.asarray(tags.tables.length)[row_a]) - after_a
    head_of_b = nonspace_before(row_b, before % stride)
    parts = jnp.where(
        first_token == last_token,
        head_of_b - after_a,
        jnp.where(first_token >= 0, tail_of_a, 0) + jnp.where(last_token < length, head_of_b, 0),
    )
    return whole_tokens + parts, parts


class TagSpan(NamedTuple):
    """The text strictly between a first opening tag and the first closing tag after it.

    inside [N, L] bool: the content tokens wholly inside; found [N] bool: both tags present and ordered;
    edge_text [N] int32: non-whitespace characters that the two tags' boundary tokens carry inside it;
    opened/closed [N] int32: keys of the opening tag's last and the closing tag's first character.
    """

    inside: jax.Array
    found: jax.Array
    edge_text: jax.Array
    opened: jax.Array
    closed: jax.Array


def tag_span(tags: Tags, open_k: int, close_k: int) -> TagSpan:
    """The span from the first tag `open_k` to the first tag `close_k` after it (see `TagSpan`)."""
    stride = tags.tables.stride
    opened = tags.matches[open_k].first_end
    closed = tags.matches[close_k].first_begin_after(opened)
    found = closed < _NO_CHAR
    positions = jnp.arange(tags.rows.shape[-1])[None]
    inside = (positions > (opened // stride)[:, None]) & (positions < (closed // stride)[:, None])
    _, edge_text = text_between(tags, opened, closed)
    inside = tags.content & inside & found[:, None]
    return TagSpan(inside, found, jnp.where(found, edge_text, 0), opened, closed)


# ----------------------------------------------------------------------------------------------
# Format (DeepSeek-R1)
# ----------------------------------------------------------------------------------------------


def format_reward(batch: Batch, spec: TokenSpec, *, require_stop: bool = True) -> jax.Array:
    """R1 format reward (arXiv 2501.12948 §2.2.2): 1.0 iff the content's text is exactly
    `ws* <think> X </think> ws* <answer> Y </answer> ws*` (ws = whitespace; X, Y anything without tags,
    possibly empty) and, with `require_stop`, a stop token ended it (not truncated). [N]
    """
    tags = find_tags(batch, spec)
    think_open, think_close, answer_open, answer_close = tags.matches
    each_once = jnp.stack([m.count == 1 for m in tags.matches]).all(0)
    ordered = (
        (think_open.first_end < think_close.first_begin)
        & (think_close.first_end < answer_open.first_begin)
        & (answer_open.first_end < answer_close.first_begin)
    )
    outside = [
        (jnp.full_like(think_open.first_begin, -1), think_open.first_begin),
        (think_close.first_end, answer_open.first_begin),
        (answer_close.first_end, jnp.full_like(answer_close.first_end, _NO_CHAR)),
    ]
    clean = jnp.stack([text_between(tags, a, b)[0] == 0 for a, b in outside]).all(0)
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
    matches = find_tags(batch, spec).matches
    once = [m.count == 1 for m in matches]
    pos = [m.first_begin for m in matches]
    score = jnp.zeros(once[0].shape, jnp.float32)
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


def _answer_span(batch: Batch, spec: TokenSpec) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Non-whitespace tokens strictly inside the first <answer> ... </answer>: ([N, L] bool, found [N],
    leading_minus [N]).

    When the tags' boundary tokens carry non-whitespace text of the answer ("42.</" as pieces "42",
    ".</"), the answer is not a token sequence and `found` is False, with one exception: a "-" right
    after <answer> in its last piece (Qwen2.5 keeps ">-" as one piece) is `leading_minus`, a sign.
    """
    tags = find_tags(batch, spec)
    span = tag_span(tags, 2, 3)
    stride, length = tags.tables.stride, tags.rows.shape[-1]
    open_token = jnp.clip(span.opened // stride, 0, length - 1)
    open_row = jnp.take_along_axis(tags.rows, open_token[:, None], axis=-1)[:, 0]
    leading_minus = (
        span.found
        & (jnp.asarray(tags.tables.minus_after[:, 2])[open_row] > 0)
        & (span.opened // stride != span.closed // stride)
    )
    found = span.found & (span.edge_text == leading_minus.astype(jnp.int32))
    tokens = batch["completion_tokens"]
    return span.inside & ~is_whitespace(tokens, spec), found, leading_minus & found


def accuracy_reward(batch: Batch, spec: TokenSpec) -> jax.Array:
    """R1 rule accuracy by exact token match: 1.0 iff the answer span without whitespace pieces equals
    `answer_tokens` without whitespace pieces. An empty answer span never scores. [N]

    Token ids must match: "▁7" and "7" differ (use `accuracy_numeric` for integers); text that a tag's
    piece carries inside the span (">-", ".</") is no token, so such an answer scores 0.
    """
    answer_tokens = batch["answer_tokens"]
    width = answer_tokens.shape[-1]
    span, found, leading_minus = _answer_span(batch, spec)
    found = found & ~leading_minus  # a sign inside a tag's piece is no token of the gold answer
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


def parse_integer(
    tokens: jax.Array, keep: jax.Array, tables: _NumberTables, leading_minus: jax.Array | None = None
) -> tuple[jax.Array, ...]:
    """Parse `-? digit+` from the kept tokens of each row (whitespace must already be dropped);
    `leading_minus` [N] bool: a "-" already read before the kept tokens (then they must not start with one).

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
    if leading_minus is not None:
        valid = valid & ~(leading_minus & has_sign)
        has_sign = has_sign | leading_minus
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
    span, found, leading_minus = _answer_span(batch, spec)
    valid_p, neg_p, digits_p, len_p = parse_integer(batch["completion_tokens"], span, tables, leading_minus)
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
    think = tag_span(find_tags(batch, spec), 0, 1)
    span, found = think.inside, think.found
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
