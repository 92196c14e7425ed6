"""The vocabulary side of the in-graph rewards, built once on the host: each token's text
(`vocabulary_texts`), the tokenizer-specific ids the rule rewards test for (`TokenSpec`), how each piece
can take part in spelling an R1 tag (`tag_relation`, `tag_tables`; the matching itself is described in
`grpo_jax.rewards.in_graph`), and the per-vocabulary language classes of the R1 language-consistency
reward (`language_vocab_mask`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import unicodedata
from typing import Any, NamedTuple

import numpy as np

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPECIAL_PIECE = re.compile(r"^<[^<>\s]+>$")

R1_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
MAX_TAG_CHARS = 30  # a tag's characters are bits of an int32 in the in-graph matcher


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


# ----------------------------------------------------------------------------------------------
# Tags: how a piece's text can take part in spelling a tag
# ----------------------------------------------------------------------------------------------


class TagRelation(NamedTuple):
    """How one piece's text can take part in spelling one tag of n characters.

    head: a in [1, n): the text ends with the tag's first a characters (0: it does not).
    tail: c in [1, n): the text starts with the tag's last c characters (0: it does not).
    middle: bit a set iff the text is exactly tag[a : a + len(text)], strictly inside the tag.
    whole: how often the whole tag occurs in the text; whole_offset: where the first one begins.
    """

    head: int
    tail: int
    middle: int
    whole: int
    whole_offset: int


def tag_relation(text: str, tag: str) -> TagRelation | None:
    """The `TagRelation` of a piece's text to a tag, or None when the text can take no part in it.

    Unambiguous for tags that pass `check_tag_texts`: at most one head length and one tail length fit.
    """
    n = len(tag)
    head = next((a for a in range(n - 1, 0, -1) if text.endswith(tag[:a])), 0) if tag[0] in text else 0
    tail = next((c for c in range(n - 1, 0, -1) if text.startswith(tag[-c:])), 0) if tag[-1] in text else 0
    middle = 0
    if text and text in tag[1:-1]:
        for a in range(1, n - len(text)):
            if tag.startswith(text, a):
                middle |= 1 << a
    whole = text.count(tag)
    if not (head or tail or middle or whole):
        return None
    return TagRelation(head, tail, middle, whole, text.find(tag) if whole else 0)


def check_tag_texts(tags: tuple[str, ...]) -> None:
    """Tags matched as token sequences must be unambiguous in any text: 2..MAX_TAG_CHARS characters, no
    whitespace, and every tag's first character (and last character) appears in no tag except as that
    tag's first (last) character, as "<" and ">" in the R1 tags. Then two occurrences never overlap
    and a piece's text can end a tag's start (or start a tag's end) in one way only."""
    firsts, lasts = {t[:1] for t in tags}, {t[-1:] for t in tags}
    for tag in tags:
        ambiguous = (
            tag[:1] in lasts
            or tag[-1:] in firsts
            or any(ch in firsts or ch in lasts for ch in tag[1:-1])
            or tags.count(tag) > 1
        )
        if not 2 <= len(tag) <= MAX_TAG_CHARS or any(ch.isspace() for ch in tag) or ambiguous:
            raise ValueError(
                f"TokenSpec: tag {tag!r} cannot be matched as a token sequence; tags {tags} need "
                f"2..{MAX_TAG_CHARS} characters, no whitespace, and first/last characters "
                f"{sorted(firsts)}/{sorted(lasts)} found nowhere else in any tag"
            )


def _spellable(tag: str, pieces: tuple[tuple[int, str], ...]) -> bool:
    """Whether some sequence of the pieces spells the tag (one piece holding it, or head, middles, tail)."""
    relations = [(len(text), r) for _, text in pieces if (r := tag_relation(text, tag))]
    if any(r.whole for _, r in relations):
        return True
    reached = 0
    for _, r in relations:
        reached |= (1 << r.head) if r.head else 0
    for _ in range(len(tag)):
        for length, r in relations:
            for a in range(1, len(tag)):
                if reached >> a & r.middle >> a & 1:
                    reached |= 1 << (a + length)
    return any(r.tail and reached >> (len(tag) - r.tail) & 1 for _, r in relations)


# ----------------------------------------------------------------------------------------------
# TokenSpec
# ----------------------------------------------------------------------------------------------


def _single_token_tag(tok: Any, tag: str) -> int:
    """The tag's id when the tokenizer always encodes the tag as that one token, else -1.

    Checked in context (after a space, a newline, text) where the tokenizer can encode: a piece that is
    the tag but is split in context (a plain BPE merge, not an added token) is not a single-token tag.
    """
    i = tok.token_to_id(tag)
    if i is None or i < 0:
        return -1
    encode = getattr(tok, "encode", None)
    if callable(encode):
        for context in (tag, f" {tag}", f"\n{tag}", f"x{tag}x", f".{tag}."):
            if int(i) not in encode(context):
                return -1
    return int(i)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenSpec:
    """Static token ids the in-graph rewards need; frozen and hashable (safe as a jit static argument).

    tag_texts: the R1 tags <think>, </think>, <answer>, </answer> (or their replacements).
    think_open/think_close/answer_open/answer_close: the id of a tag the tokenizer keeps as ONE token, or
      -1: that tag is matched as a token sequence, from `tag_pieces` (grpo_jax.rewards.in_graph).
    tag_pieces: (id, text) of every piece that can take part in spelling a -1 tag (`tag_relation`).
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
    tag_texts: tuple[str, str, str, str] = R1_TAGS
    tag_pieces: tuple[tuple[int, str], ...] = ()

    def __post_init__(self):
        single = [t for t in self.tag_ids if t != -1]
        if len(set(single)) != len(single) or not all(0 <= t < self.vocab_size for t in single):
            raise ValueError(
                f"TokenSpec: the tag ids must be distinct ids in [0, {self.vocab_size}) or -1 (a tag "
                f"matched as a token sequence), got {self.tag_ids}"
            )
        if len(self.tag_texts) != 4:
            raise ValueError(f"TokenSpec: tag_texts must hold 4 tags, got {self.tag_texts}")
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
        table_ids += tuple(i for i, _ in self.tag_pieces)
        if not all(text for _, text in self.tag_pieces):
            raise ValueError("TokenSpec: every tag piece needs its (non-empty) text")
        out_of_range = sorted(i for i in table_ids if not 0 <= i < self.vocab_size)
        if out_of_range:
            raise ValueError(
                f"TokenSpec: ids {out_of_range[:8]} are outside the vocabulary [0, {self.vocab_size})"
            )
        sequences = [tag for tag, i in zip(self.tag_texts, self.tag_ids, strict=True) if i == -1]
        if sequences:
            check_tag_texts(self.tag_texts)
        for tag in sequences:
            if not _spellable(tag, self.tag_pieces):
                raise ValueError(
                    f"TokenSpec: {tag!r} is neither one token nor spelled by any sequence of this "
                    "vocabulary's pieces; add the R1 tags as user-defined (special) tokens"
                )

    @property
    def tag_ids(self) -> tuple[int, int, int, int]:
        """The single-token tag ids (-1: the tag is matched as a token sequence)."""
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
        """Build from the tokenizer protocol (`token_to_id`, `id_to_piece`, `vocab_size`, `eos_id`, `pad_id`;
        `encode` and `special_ids` where present).

        A tag the tokenizer always keeps as one token is matched by its id; any other tag by the pieces
        that can spell it. Raises ValueError when no sequence of pieces spells a tag.
        """

        def single_id(piece: str) -> int:
            i = tok.token_to_id(piece)
            if i is None or i < 0:
                raise ValueError(f"TokenSpec.from_tokenizer: stop piece {piece!r} is not a token")
            return int(i)

        tag_texts = (think_open, think_close, answer_open, answer_close)
        tags = tuple(_single_token_tag(tok, tag) for tag in tag_texts)
        sequences = [tag for tag, i in zip(tag_texts, tags, strict=True) if i == -1]
        stop_ids = tuple(dict.fromkeys([int(tok.eos_id)] + [single_id(p) for p in extra_stop_pieces]))
        specials = set(tags) | set(stop_ids) | _special_ids(tok)
        whitespace, numbers, minus, tag_pieces = [], [], [], []
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
            if any(tag_relation(text, tag) for tag in sequences):
                tag_pieces.append((i, text))

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
            tag_texts=tag_texts,
            tag_pieces=tuple(tag_pieces),
        )


class TagTables(NamedTuple):
    """Per-piece tag relations for the in-graph matcher (grpo_jax.rewards.in_graph), numpy.

    row [V] int32: each token's row below; 0 (all zeros) for a piece that takes part in no tag.
    head, tail, middle, whole, whole_offset [R, 4] int32: the `TagRelation` of each row's piece to each
      tag. A single-token tag relates to its own id only (whole = 1 at offset 0).
    minus_after [R, 4] int32: 1 iff the text after the tag's end in the piece is "-" (whitespace aside).
    length [R] int32: characters of the row's piece. nonspace_before [R, stride + 1] int32: non-whitespace
      characters among its first o characters.
    stride: one more than the longest such piece: a character's key is token_index * stride + offset.
    """

    row: np.ndarray
    head: np.ndarray
    tail: np.ndarray
    middle: np.ndarray
    whole: np.ndarray
    whole_offset: np.ndarray
    minus_after: np.ndarray
    length: np.ndarray
    nonspace_before: np.ndarray
    stride: int


@functools.lru_cache(maxsize=16)
def tag_tables(spec: TokenSpec) -> TagTables:
    """The `TagTables` of a spec: its tag pieces, and each single-token tag's own id."""
    pieces = {i: text for i, text in spec.tag_pieces}
    pieces.update({i: tag for i, tag in zip(spec.tag_ids, spec.tag_texts, strict=True) if i >= 0})
    ids = sorted(pieces)
    stride = max(len(text) for text in pieces.values()) + 1
    rows = len(ids) + 1
    row = np.zeros(spec.vocab_size, np.int32)
    relation = np.zeros((6, rows, 4), np.int32)  # head, tail, middle, whole, whole_offset, minus_after
    length = np.zeros(rows, np.int32)
    nonspace_before = np.zeros((rows, stride + 1), np.int32)
    for r, i in enumerate(ids, start=1):
        text = pieces[i]
        row[i], length[r] = r, len(text)
        nonspace = np.cumsum([not ch.isspace() for ch in text])
        nonspace_before[r, 1 : len(text) + 1] = nonspace
        nonspace_before[r, len(text) + 1 :] = nonspace[-1]
        for k, (tag, tag_id) in enumerate(zip(spec.tag_texts, spec.tag_ids, strict=True)):
            if tag_id >= 0:
                found = TagRelation(0, 0, 0, 1, 0) if i == tag_id else None
            else:
                found = tag_relation(text, tag)
            if found is not None:
                end = found.tail if found.tail else found.whole_offset + len(tag) if found.whole else 0
                minus_after = bool(end) and text[end:].strip() == "-"
                relation[:, r, k] = (*found, minus_after)
    return TagTables(row, *relation, length, nonspace_before, stride)


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
