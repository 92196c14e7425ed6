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
`TokenSpec.from_tokenizer`. The "completion content" is every masked token except a final stop token.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import unicodedata
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.rewards.registry import register_reward

Batch = Mapping[str, jax.Array]

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPECIAL_PIECE = re.compile(r"^<[^<>\s]+>$")


# ----------------------------------------------------------------------------------------------
# Vocabulary: static token ids and per-piece text
# ----------------------------------------------------------------------------------------------


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's `bytes_to_unicode`: byte-level BPE pieces spell each byte as one character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _piece(tok: Any, i: int) -> str:
    try:
        return tok.id_to_piece(i) or ""
    except IndexError:  # a hole in an HF vocabulary
        return ""


def _special_ids(tok: Any) -> set[int]:
    """eos, pad and, where the tokenizer lists them, its special/added tokens."""
    specials = {int(tok.eos_id), int(tok.pad_id)}
    if callable(getattr(tok, "special_ids", None)):
        specials |= {int(i) for i in tok.special_ids().values()}
    return specials


def vocabulary_texts(tok: Any, *, byte_level: bool | None = None) -> list[str]:
    """The surface text of every piece: "▁" -> " ", "<0x0A>" -> "\\n", byte-level BPE ("Ġ", "ä¸Ń")
    decoded to UTF-8 (a split multi-byte character becomes U+FFFD). Special pieces ("<s>") are kept.

    `byte_level=None` detects GPT-2 style vocabularies: a "Ġ" piece and no "▁" piece.
    """
    if byte_level is None:
        byte_level = tok.token_to_id("Ġ") is not None and tok.token_to_id("▁") is None
    to_byte = _gpt2_unicode_to_byte() if byte_level else {}
    texts = []
    for i in range(tok.vocab_size):
        piece = _piece(tok, i)
        fallback = _BYTE_FALLBACK.match(piece)
        if fallback:
            texts.append(chr(int(fallback.group(1), 16)) if int(fallback.group(1), 16) < 128 else "\ufffd")
        elif byte_level and not _SPECIAL_PIECE.match(piece) and all(ch in to_byte for ch in piece):
            texts.append(bytes(to_byte[ch] for ch in piece).decode("utf-8", errors="replace"))
        else:
            texts.append(piece.replace("▁", " "))
    return texts


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenSpec:
    """Static token ids the in-graph rewards need; frozen and hashable (safe as a jit static argument).

    think_open/think_close/answer_open/answer_close: ids of the R1 tags (each must be ONE piece).
    stop_ids: tokens that end a completion (EOS and friends). pad_id: padding id.
    whitespace_ids: pieces whose text is only whitespace ("▁", "\\n", "<0x0A>").
    digit_ids: ids of "0".."9" in order, -1 where absent. minus_id: id of "-" (-1 if absent).
    number_pieces: (id, digits) for EVERY piece whose text, stripped of whitespace, is ASCII digits —
      "7", "▁7" (SentencePiece may encode " 7" as one piece) and multi-digit pieces ("123").
      Empty means: derived from digit_ids.
    minus_ids: every piece whose stripped text is "-" ("-", "▁-"). Empty means: (minus_id,).
    """

    think_open: int
    think_close: int
    answer_open: int
    answer_close: int
    stop_ids: tuple[int, ...]
    pad_id: int
    whitespace_ids: tuple[int, ...] = ()
    digit_ids: tuple[int, ...] = (-1,) * 10
    minus_id: int = -1
    vocab_size: int
    number_pieces: tuple[tuple[int, str], ...] = ()
    minus_ids: tuple[int, ...] = ()

    def __post_init__(self):
        tags = (self.think_open, self.think_close, self.answer_open, self.answer_close)
        if len(set(tags)) != 4 or not all(0 <= t < self.vocab_size for t in tags):
            raise ValueError(
                f"TokenSpec: the four tag ids must be distinct ids in [0, {self.vocab_size}), got {tags}"
            )
        if not self.stop_ids:
            raise ValueError("TokenSpec: stop_ids must not be empty")
        if len(self.digit_ids) != 10:
            raise ValueError(
                f"TokenSpec: digit_ids must list the ids of '0'..'9' (10 entries), got {self.digit_ids}"
            )
        for i, digits in self.number_pieces:
            if not digits or not digits.isascii() or not digits.isdigit():
                raise ValueError(f"TokenSpec: number piece {i} has non-digit text {digits!r}")
        table_ids = self.whitespace_ids + self.minus_ids + tuple(i for i, _ in self.number_pieces)
        out_of_range = sorted(i for i in table_ids if not 0 <= i < self.vocab_size)
        if out_of_range:
            raise ValueError(
                f"TokenSpec: ids {out_of_range[:8]} are outside the vocabulary [0, {self.vocab_size})"
            )

    @property
    def tag_ids(self) -> tuple[int, int, int, int]:
        return (self.think_open, self.think_close, self.answer_open, self.answer_close)

    @classmethod
    def from_tokenizer(
        cls,
        tok: Any,
        *,
        think_open: str = "<think>",
        think_close: str = "</think>",
        answer_open: str = "<answer>",
        answer_close: str = "</answer>",
        extra_stop_pieces: tuple[str, ...] = (),
    ) -> TokenSpec:
        """Build from the tokenizer protocol (`token_to_id`, `id_to_piece`, `vocab_size`, `eos_id`, `pad_id`).

        Raises ValueError when a tag is not a single piece: add the tags as user-defined/special tokens.
        """

        def single_id(piece: str) -> int:
            i = tok.token_to_id(piece)
            if i is None or i < 0:
                raise ValueError(
                    f"TokenSpec.from_tokenizer: {piece!r} is not a single token of this tokenizer; "
                    "add the R1 tags as user-defined (special) tokens"
                )
            return int(i)

        tags = tuple(single_id(p) for p in (think_open, think_close, answer_open, answer_close))
        stop_ids = tuple(dict.fromkeys([int(tok.eos_id)] + [single_id(p) for p in extra_stop_pieces]))
        specials = set(tags) | set(stop_ids) | _special_ids(tok)
        whitespace, numbers, minus = [], [], []
        for i, text in enumerate(vocabulary_texts(tok)):
            if i in specials or not text:
                continue
            stripped = text.strip()
            if text.isspace():
                whitespace.append(i)
            elif stripped.isascii() and stripped.isdigit():
                numbers.append((i, stripped))
            elif stripped == "-":
                minus.append(i)

        def id_or_absent(piece: str) -> int:
            i = tok.token_to_id(piece)
            return -1 if i is None else int(i)

        return cls(
            think_open=tags[0],
            think_close=tags[1],
            answer_open=tags[2],
            answer_close=tags[3],
            stop_ids=stop_ids,
            pad_id=int(tok.pad_id),
            whitespace_ids=tuple(whitespace),
            digit_ids=tuple(id_or_absent(str(d)) for d in range(10)),
            minus_id=id_or_absent("-"),
            vocab_size=int(tok.vocab_size),
            number_pieces=tuple(numbers),
            minus_ids=tuple(minus),
        )


class VocabLanguageMask(NamedTuple):
    """Per-vocabulary language classes (numpy bool [V]): `is_target` ⊆ `is_countable`."""

    is_target: np.ndarray
    is_countable: np.ndarray


_CJK_NAME_PREFIXES = (
    "CJK UNIFIED IDEOGRAPH",
    "CJK COMPATIBILITY IDEOGRAPH",
    "HIRAGANA",
    "KATAKANA",
    "HANGUL",
)


def _is_cjk(ch: str) -> bool:
    return unicodedata.name(ch, "").startswith(_CJK_NAME_PREFIXES)


def language_vocab_mask(
    tok: Any, language: str = "latin", *, byte_level: bool | None = None
) -> VocabLanguageMask:
    """Classify every piece once for the R1 language-consistency reward (arXiv 2501.12948 §2.3.3).

    A piece is countable iff its text has a letter (`str.isalpha`, which includes ideographs);
    digits, punctuation, whitespace and special pieces ("<s>", "<think>", "<0x0A>") are neutral.
    "latin": target iff every letter is Latin script (ASCII or accented Latin).
    "cjk": target iff the piece has a CJK ideograph, kana or hangul character.
    """
    if language not in ("latin", "cjk"):
        raise ValueError(f"language_vocab_mask: language must be 'latin' or 'cjk', got {language!r}")
    texts = vocabulary_texts(tok, byte_level=byte_level)
    specials = _special_ids(tok)
    is_target = np.zeros(len(texts), bool)
    is_countable = np.zeros(len(texts), bool)
    for i, text in enumerate(texts):
        if i in specials or _SPECIAL_PIECE.match(_piece(tok, i)):
            continue
        letters = [ch for ch in text if ch.isalpha()]
        if not letters:
            continue
        is_countable[i] = True
        if language == "latin":
            is_target[i] = all(unicodedata.name(ch, "").startswith("LATIN") for ch in letters)
        else:
            is_target[i] = any(_is_cjk(ch) for ch in letters)
    return VocabLanguageMask(is_target, is_countable)


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
