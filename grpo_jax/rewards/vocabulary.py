"""The vocabulary side of the in-graph rewards, built once on the host: each token's text
(`vocabulary_texts`), the tokenizer-specific ids the rule rewards test for (`TokenSpec`), and the
per-vocabulary language classes of the R1 language-consistency reward (`language_vocab_mask`).
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from typing import Any, NamedTuple

import numpy as np

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
