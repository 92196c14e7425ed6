"""grain pipelines: prompt batches for RL and prompt+completion batches for SFT, static shapes throughout.

Both pipelines share one index stream over the example list:

  range(N) -> shuffle(seed) -> repeat(num_epochs) -> [cut to whole global batches]
           -> [shard_index::shard_count] -> tokenize -> batch(batch_size // shard_count, drop_remainder)

- grain reseeds the shuffle every epoch (seed + epoch), so each epoch has its own order and every example is
  seen exactly once per epoch. Batches are formed over the repeated stream, so a batch may straddle an epoch
  boundary; with a finite `num_epochs` the final partial global batch is dropped.
- `batch_size` is the GLOBAL batch. Process `shard_index` of `shard_count` (pass `jax.process_index()`
  and `jax.process_count()`) gets every `shard_count`-th element of the stream, `batch_size // shard_count`
  rows per batch; the shards of one step are disjoint and together are the global batch. Every process
  yields the same number of batches.
- The datasets are random access underneath, so iterators are checkpointable: `state = it.get_state()`; a
  fresh `iter(ds)` with `set_state(state)` yields the same next batch (the state is a small dict to store with
  the checkpoint).
- Batches carry `example_index` (int32 [B]) into the caller's `examples` list, so host-side rewards can
  look up gold answers (`examples[i]["answer"]`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from grpo_jax.data.templates import format_prompt
from grpo_jax.rewards.registry import ROUTES

Example = dict[str, Any]


def _encode_prompt_text(example: Example, tokenizer: Any, template: str, add_bos: bool) -> list[int]:
    text = format_prompt(template, example["prompt"], tokenizer)
    return tokenizer.encode(text, add_bos=add_bos and tokenizer.bos_id is not None)


def tokenize_prompt(
    example: Example, tokenizer: Any, template: str, max_prompt_len: int, *, add_bos: bool = True
) -> tuple[np.ndarray, np.ndarray, bool]:
    """The templated prompt of `example`, left-padded to `max_prompt_len`.

    Truncation keeps the END of the prompt (and the BOS token, if any): the template's closing words
    ("Assistant:") are what the policy continues from, and the question's end usually holds the actual ask.

    Returns:
      ids: int32 [max_prompt_len], pad_id on the left.
      mask: int32 [max_prompt_len], 1 on real tokens.
      truncated: whether tokens were dropped.
    """
    ids = _encode_prompt_text(example, tokenizer, template, add_bos)
    truncated = len(ids) > max_prompt_len
    if truncated:
        has_bos = add_bos and tokenizer.bos_id is not None
        ids = ids[:1] + ids[len(ids) - max_prompt_len + 1 :] if has_bos else ids[len(ids) - max_prompt_len :]
    padding = max_prompt_len - len(ids)
    tokens = np.full((max_prompt_len,), tokenizer.pad_id, dtype=np.int32)
    tokens[padding:] = ids
    mask = np.zeros((max_prompt_len,), dtype=np.int32)
    mask[padding:] = 1
    return tokens, mask, truncated


def tokenize_answer(answer: str, tokenizer: Any, max_answer_len: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """`tokenizer.encode(answer)` right-padded (truncated) to `max_answer_len`: ids int32 [A], mask int32 [A].

    With SentencePiece (dummy prefix on) these are exactly the tokens between `<answer>` and `</answer>` in
    `<answer> 81 </answer>`, leading `▁` included. Other tokenizers may differ in a leading whitespace
    token, so in-graph matching should ignore whitespace-only tokens.
    """
    ids = tokenizer.encode(answer)
    truncated = len(ids) > max_answer_len
    ids = ids[:max_answer_len]
    tokens = np.full((max_answer_len,), tokenizer.pad_id, dtype=np.int32)
    tokens[: len(ids)] = ids
    mask = np.zeros((max_answer_len,), dtype=np.int32)
    mask[: len(ids)] = 1
    return tokens, mask, truncated


def prompt_length_stats(
    examples: Sequence[Example], tokenizer: Any, *, template: str, max_prompt_len: int, add_bos: bool = True
) -> dict[str, int]:
    """How many prompts `max_prompt_len` would truncate, and the longest prompt; for logging at start."""
    lengths = [len(_encode_prompt_text(e, tokenizer, template, add_bos)) for e in examples]
    return {
        "num_examples": len(lengths),
        "num_truncated_prompts": sum(n > max_prompt_len for n in lengths),
        "max_prompt_tokens": max(lengths, default=0),
    }


def _index_stream(
    num_examples: int,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    shard_index: int,
    shard_count: int,
) -> grain.MapDataset:
    """Example indices in the order this shard consumes them (see the module docstring)."""
    if num_examples == 0:
        raise ValueError("No examples to build a dataset from.")
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(
            f"Need 0 <= shard_index < shard_count; got shard_index={shard_index}, {shard_count=}."
        )
    if batch_size < 1 or batch_size % shard_count:
        raise ValueError(f"Global batch_size={batch_size} must be a positive multiple of {shard_count=}.")
    if num_epochs is not None and num_epochs * num_examples < batch_size:
        raise ValueError(
            f"{num_epochs} epoch(s) of {num_examples} examples do not fill one batch of {batch_size}; "
            "use more examples, more epochs, or num_epochs=None."
        )
    ds = grain.MapDataset.range(num_examples)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if num_epochs is not None:
        ds = ds[: len(ds) // batch_size * batch_size]
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    return ds


def _to_iter(ds: grain.MapDataset, num_threads: int, prefetch: int) -> grain.IterDataset:
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))


def make_prompt_dataset(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    template: str,
    max_prompt_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    max_answer_len: int = 16,
    add_bos: bool = True,
    num_threads: int = 1,
    prefetch: int = 2,
) -> grain.IterDataset:
    """Batches of left-padded prompts for the RL sampler, plus tokenized gold answers for in-graph rewards.

    Each batch (B = batch_size // shard_count, P = max_prompt_len, A = max_answer_len):
      prompt_tokens    int32 [B, P]  left-padded with pad_id
      prompt_mask      int32 [B, P]  1 on prompt tokens
      prompt_truncated bool  [B]     the prompt lost tokens at the front (see `tokenize_prompt`)
      example_index    int32 [B]     row of `examples`
      answer_tokens    int32 [B, A]  `tokenizer.encode(answer)`, right-padded with pad_id
      answer_mask      int32 [B, A]
      answer_truncated bool  [B]
      route            int32 [B]     index into `grpo_jax.rewards.registry.ROUTES` of `example["route"]`
                                     ("verifiable" when absent): which rewards apply to the row

    Args:
      template: a key of `grpo_jax.data.templates.TEMPLATES`.
      batch_size: the global batch (prompts per RL step across all processes).
      num_epochs: None repeats forever.
      shard_index, shard_count: this process and the number of processes.
      add_bos: prepend BOS when the tokenizer has one.
      num_threads, prefetch: grain read threads and prefetch buffer (in batches).
    """
    examples = list(examples)
    indices = _index_stream(
        len(examples),
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_index=shard_index,
        shard_count=shard_count,
    )

    def encode(index: int) -> dict[str, np.ndarray]:
        example = examples[index]
        tokens, mask, truncated = tokenize_prompt(
            example, tokenizer, template, max_prompt_len, add_bos=add_bos
        )
        answer, answer_mask, answer_truncated = tokenize_answer(
            str(example["answer"]), tokenizer, max_answer_len
        )
        return {
            "prompt_tokens": tokens,
            "prompt_mask": mask,
            "prompt_truncated": np.bool_(truncated),
            "example_index": np.int32(index),
            "answer_tokens": answer,
            "answer_mask": answer_mask,
            "answer_truncated": np.bool_(answer_truncated),
            "route": np.int32(ROUTES.index(example.get("route", "verifiable"))),
        }

    batched = indices.map(encode).batch(batch_size // shard_count, drop_remainder=True)
    return _to_iter(batched, num_threads, prefetch)


def completion_tokens(example: Example, tokenizer: Any) -> tuple[list[int], list[int]]:
    """The completion's ids with EOS and a 0/1 trainable flag per id.

    Without `example["completion_segments"]`: `tokenizer.encode(completion)`, every id trainable. With it
    (`[(text, trainable), ...]`, texts joined = the completion; e.g. a tool call, the tool's observation,
    the answer): each segment encoded on its own, as a multi-turn rollout encodes an observation
    (grpo_jax/rollout/turns.py), so SFT sees the token sequence a rollout would hold; ids of an untrainable
    segment get 0. The EOS is trainable.
    """
    segments = example.get("completion_segments")
    if not segments:
        ids = tokenizer.encode(example["completion"])
        return [*ids, tokenizer.eos_id], [1] * (len(ids) + 1)
    ids, trainable = [], []
    for index, segment in enumerate(segments):
        if len(segment) != 2 or not isinstance(segment[0], str):
            raise ValueError(
                f"completion_segments[{index}] must be a (text, trainable) pair; got {segment!r} "
                f"(prompt {example.get('prompt', '')!r})"
            )
        text, flag = segment
        segment_ids = tokenizer.encode(text)
        ids += segment_ids
        trainable += [int(bool(flag))] * len(segment_ids)
    return [*ids, tokenizer.eos_id], [*trainable, 1]


def tokenize_sft_example(
    example: Example, tokenizer: Any, template: str, max_len: int, *, add_bos: bool = True
) -> dict[str, np.ndarray]:
    """`[bos] prompt completion eos`, right-padded to `max_len`.

    `loss_mask` is 1 on the completion tokens and the EOS (the tokens the model must produce), 0 on the
    tokens of untrainable `completion_segments` (a tool's observation: see `completion_tokens`), aligned
    with `tokens`: the loss reads logits at t-1 for the target at t. Sequences longer than `max_len` lose
    their end (`truncated`); a prompt that fills `max_len` leaves an all-zero loss_mask.
    """
    prompt = _encode_prompt_text(example, tokenizer, template, add_bos)
    completion, trainable = completion_tokens(example, tokenizer)
    ids = (prompt + completion)[:max_len]
    tokens = np.full((max_len,), tokenizer.pad_id, dtype=np.int32)
    tokens[: len(ids)] = ids
    attention_mask = np.zeros((max_len,), dtype=np.int32)
    attention_mask[: len(ids)] = 1
    loss_mask = np.zeros((max_len,), dtype=np.int32)
    loss_mask[: len(ids)] = ([0] * len(prompt) + trainable)[:max_len]
    return {
        "tokens": tokens,
        "loss_mask": loss_mask,
        "attention_mask": attention_mask,
        "truncated": np.bool_(len(prompt) + len(completion) > max_len),
    }


def make_sft_dataset(
    examples: Sequence[Example],
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
    """Batches for supervised fine-tuning on `example["completion"]` (cold start, rejection-sampling SFT).

    Each batch (B = batch_size // shard_count, T = max_len), right-padded, see `tokenize_sft_example`:
      tokens         int32 [B, T]
      loss_mask      int32 [B, T]  1 on completion tokens incl. EOS, 0 on untrainable segments
      attention_mask int32 [B, T]  1 on real tokens
      truncated      bool  [B]
      example_index  int32 [B]
    Sharding, shuffling, epochs and checkpointing as in `make_prompt_dataset`.
    """
    examples = list(examples)
    indices = _index_stream(
        len(examples),
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_index=shard_index,
        shard_count=shard_count,
    )

    def encode(index: int) -> dict[str, np.ndarray]:
        row = tokenize_sft_example(examples[index], tokenizer, template, max_len, add_bos=add_bos)
        row["example_index"] = np.int32(index)
        return row

    batched = indices.map(encode).batch(batch_size // shard_count, drop_remainder=True)
    return _to_iter(batched, num_threads, prefetch)


def sft_length_stats(
    examples: Sequence[Example], tokenizer: Any, *, template: str, max_len: int, add_bos: bool = True
) -> dict[str, int]:
    """How many SFT sequences `max_len` would truncate, and the longest one; for logging at start."""
    lengths = [
        len(_encode_prompt_text(e, tokenizer, template, add_bos)) + len(completion_tokens(e, tokenizer)[0])
        for e in examples
    ]
    return {
        "num_examples": len(lengths),
        "num_truncated": sum(n > max_len for n in lengths),
        "max_tokens": max(lengths, default=0),
    }
