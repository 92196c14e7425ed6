"""Preference pairs for reward-model (Bradley-Terry) and DPO training: synthetic, JSONL, grain batches.

A pair is a plain dict `{"prompt", "chosen", "rejected", ...}`: two completions of one prompt, the first
preferred. `synthetic_preference_pairs` makes them offline from a task's demonstrations (the chosen side is
the correct, well-formed `<think> … </think> <answer> … </answer>` completion; the rejected side corrupts it
in one named way), so a reward model can be trained and checked with no human labels and no download.

Batches come from the same index stream as `make_sft_dataset` (shuffle, epochs, process sharding,
checkpointable iterators: see `grpo_jax.data.pipeline`), and each side of a pair is laid out exactly like an
SFT example (`tokenize_sft_example`), so the DPO step reads its masks the way the SFT step does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from grpo_jax.data.files import read_records
from grpo_jax.data.pipeline import _encode_prompt_text, _index_stream, _to_iter, tokenize_sft_example

Pair = dict[str, Any]
PAIR_FIELDS = ("prompt", "chosen", "rejected")
CORRUPTIONS = ("wrong_answer", "malformed", "wrong_step")

# `<think> reasoning </think> <answer> answer </answer>`, each tag exactly once, in order.
_NO_TAG = r"(?:(?!</?think>|</?answer>).)*"
_R1_COMPLETION = re.compile(
    rf"(\s*<think>)({_NO_TAG})(</think>\s*<answer>)({_NO_TAG})(</answer>\s*)", re.DOTALL
)
_NUMBER = re.compile(r"\d+")


# --------------------------------------------------------------------------------------------------
# Corruptions: (think, answer, rng) of a well-formed completion -> a rejected completion, or None
# --------------------------------------------------------------------------------------------------


def _other_digit(digit: str, rng: np.random.Generator, *, nonzero: bool) -> str:
    choices = [d for d in "0123456789" if d != digit and not (nonzero and d == "0")]
    return choices[rng.integers(len(choices))]


def _change_one_digit(number: str, rng: np.random.Generator) -> str:
    """A different number of the same width: one digit replaced (a leading digit never becomes 0)."""
    i = int(rng.integers(len(number)))
    return number[:i] + _other_digit(number[i], rng, nonzero=i == 0 and len(number) > 1) + number[i + 1 :]


def _wrong_answer(match: re.Match, rng: np.random.Generator) -> str | None:
    """The final answer replaced by a different number; reasoning and format untouched."""
    answer = match.group(4)
    stripped = answer.strip()
    if re.fullmatch(r"-?\d+", stripped):
        value = int(stripped)
        offsets = [d for d in range(-9, 10) if d != 0 and (value < 0 or value + d >= 0)]
        wrong = str(value + offsets[rng.integers(len(offsets))])
    elif _NUMBER.search(stripped):  # e.g. "3/4", "1.5": change one digit of one number
        numbers = list(_NUMBER.finditer(stripped))
        m = numbers[rng.integers(len(numbers))]
        wrong = stripped[: m.start()] + _change_one_digit(m.group(), rng) + stripped[m.end() :]
    else:  # a non-numeric answer: any number is wrong
        wrong = str(int(rng.integers(10, 1000)))
    new_answer = answer.replace(stripped, wrong, 1) if stripped else f" {wrong} "
    return match.group(1) + match.group(2) + match.group(3) + new_answer + match.group(5)


def _malformed(match: re.Match, rng: np.random.Generator) -> str | None:
    """The same reasoning and answer with the R1 tags broken: all dropped, answer tags dropped, the two
    blocks swapped, or `</think>` missing."""
    think, answer = match.group(2).strip(), match.group(4).strip()
    variants = (
        f"{think} {answer}",
        f"<think> {think} </think> {answer}",
        f"<answer> {answer} </answer> <think> {think} </think>",
        f"<think> {think} <answer> {answer} </answer>",
    )
    return variants[rng.integers(len(variants))]


def _wrong_step(match: re.Match, rng: np.random.Generator) -> str | None:
    """One number in the reasoning changed (a step's result `=N` when there is one), so the chain no longer
    holds; format and final answer untouched. None when the reasoning has no number."""
    think = match.group(2)
    numbers = list(_NUMBER.finditer(think))
    results = [m for m in numbers if think[: m.start()].rstrip().endswith("=")]
    candidates = results or numbers
    if not candidates:
        return None
    m = candidates[rng.integers(len(candidates))]
    think = think[: m.start()] + _change_one_digit(m.group(), rng) + think[m.end() :]
    return match.group(1) + think + match.group(3) + match.group(4) + match.group(5)


_CORRUPT = {"wrong_answer": _wrong_answer, "malformed": _malformed, "wrong_step": _wrong_step}


def synthetic_preference_pairs(
    examples: Sequence[dict[str, Any]], *, seed: int, kinds: Sequence[str] = CORRUPTIONS
) -> list[Pair]:
    """Offline preference pairs from a task's demonstrations: chosen = the example's completion, rejected =
    a corrupted copy.

    Kinds of corruption (balanced over the pairs, assigned and applied with a generator seeded by `seed`):
      wrong_answer: the number in `<answer> … </answer>` changed (±1..9 for integers; one digit otherwise).
      malformed:    the R1 tags dropped or misordered; reasoning and answer text unchanged.
      wrong_step:   one digit of a step's result changed, so the written chain is wrong; format and final
                    answer unchanged (the pair a process-aware reward model must rank).
    Examples without a completion, or whose completion is not `<think> … </think> <answer> … </answer>`, are
    skipped; when the assigned kind cannot apply (no number in the reasoning), another kind is used.

    Returns one pair per usable example, in example order:
      {"prompt", "chosen", "rejected", "kind", "answer", "example_index"} (index into `examples`).
    """
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in _CORRUPT]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {CORRUPTIONS}; got {kinds!r}.")
    rng = np.random.default_rng(seed)
    assigned = rng.permutation(np.resize(np.arange(len(kinds)), len(examples)))  # balanced, shuffled
    pairs = []
    for index, (example, first) in enumerate(zip(examples, assigned, strict=True)):
        completion = example.get("completion")
        match = _R1_COMPLETION.fullmatch(completion) if isinstance(completion, str) else None
        if match is None:
            continue
        order = [kinds[first]] + [kinds[i] for i in rng.permutation(len(kinds)) if i != first]
        for kind in order:
            rejected = _CORRUPT[kind](match, rng)
            if rejected is not None and rejected != completion:
                pairs.append(
                    {
                        "prompt": example["prompt"],
                        "chosen": completion,
                        "rejected": rejected,
                        "kind": kind,
                        "answer": str(example.get("answer", "")),
                        "example_index": index,
                    }
                )
                break
    return pairs


# --------------------------------------------------------------------------------------------------
# JSONL
# --------------------------------------------------------------------------------------------------


def load_preference_jsonl(path: str | os.PathLike) -> list[Pair]:
    """Reads `{"prompt", "chosen", "rejected", ...}` records (other fields kept) from a JSONL file (blank
    lines skipped) or a Parquet file (`.parquet`/`.pq`: one row per pair; `data.files.read_records`).

    Raises:
      FileNotFoundError: no file at `path`.
      ValueError: `path:line: problem` (JSONL, 1-based) or `path: row i: problem` (Parquet, 0-based) for
        the first malformed record (bad JSON, not an object, a missing or non-string field), a Parquet file
        without one of the columns, or a file that holds no records.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Preference file not found: {path}")
    pairs = []
    for where, record in read_records(path, PAIR_FIELDS):
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for field in PAIR_FIELDS:
            if field not in record:
                raise ValueError(f"{where}: missing field {field!r} (fields present: {sorted(record)})")
            if not isinstance(record[field], str):
                raise ValueError(
                    f"{where}: field {field!r} must be a string, got {type(record[field]).__name__}"
                )
        pairs.append(record)
    if not pairs:
        raise ValueError(f"{path}: preference file is empty (no records).")
    return pairs


# --------------------------------------------------------------------------------------------------
# Tokenization and the grain pipeline
# --------------------------------------------------------------------------------------------------


def tokenize_preference_pair(
    pair: Pair, tokenizer: Any, template: str, max_len: int, *, add_bos: bool = True
) -> dict[str, np.ndarray]:
    """Both sides of a pair laid out like SFT examples (`tokenize_sft_example`): `[bos] prompt side eos`,
    right-padded to `max_len`, loss mask 1 on the side's tokens and EOS (aligned with the tokens).

    Returns {chosen,rejected}_{tokens,attention_mask,loss_mask} int32 [max_len] and `truncated` (bool: either
    side lost its end; a reward model then scores a cut sequence, DPO sums fewer tokens).
    """
    row: dict[str, np.ndarray] = {}
    truncated = False
    for side in ("chosen", "rejected"):
        encoded = tokenize_sft_example(
            {"prompt": pair["prompt"], "completion": pair[side]},
            tokenizer,
            template,
            max_len,
            add_bos=add_bos,
        )
        row[f"{side}_tokens"] = encoded["tokens"]
        row[f"{side}_attention_mask"] = encoded["attention_mask"]
        row[f"{side}_loss_mask"] = encoded["loss_mask"]
        truncated = truncated or bool(encoded["truncated"])
    row["truncated"] = np.bool_(truncated)
    return row


def make_preference_dataset(
    pairs: Sequence[Pair],
    tokenizer: Any,
    *,
    template: str,
    max_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    add_bos: bool = True,
    num_threads: int = 1,
    prefetch: int = 2,
) -> grain.IterDataset:
    """Batches of preference pairs for the reward-model and DPO steps.

    Each batch (B = batch_size // shard_count pairs, T = max_len), right-padded, see
    `tokenize_preference_pair`:
      chosen_tokens, chosen_attention_mask, chosen_loss_mask          int32 [B, T]
      rejected_tokens, rejected_attention_mask, rejected_loss_mask    int32 [B, T]
      truncated      bool  [B]
      example_index  int32 [B]  row of `pairs`
    Sharding, shuffling, epochs and checkpointing (`get_state`/`set_state`) as in `make_sft_dataset`.
    """
    pairs = list(pairs)
    indices = _index_stream(
        len(pairs),
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_index=shard_index,
        shard_count=shard_count,
    )

    def encode(index: int) -> dict[str, np.ndarray]:
        row = tokenize_preference_pair(pairs[index], tokenizer, template, max_len, add_bos=add_bos)
        row["example_index"] = np.int32(index)
        return row

    batched = indices.map(encode).batch(batch_size // shard_count, drop_remainder=True)
    return _to_iter(batched, num_threads, prefetch)


def preference_length_stats(
    pairs: Sequence[Pair], tokenizer: Any, *, template: str, max_len: int, add_bos: bool = True
) -> dict[str, int]:
    """How many pairs `max_len` would truncate (either side), and the longest side; for logging at start."""
    lengths = []
    for pair in pairs:
        prompt = len(_encode_prompt_text(pair, tokenizer, template, add_bos))
        side = max(len(tokenizer.encode(pair[s])) for s in ("chosen", "rejected"))
        lengths.append(prompt + side + 1)  # + EOS
    return {
        "num_pairs": len(lengths),
        "num_truncated": sum(n > max_len for n in lengths),
        "max_tokens": max(lengths, default=0),
    }
