"""Preference pairs: synthetic corruptions do what they say, JSONL errors name file:line, grain batches."""

import json
import re

import numpy as np
import pytest

from grpo_jax.data import (
    ArithmeticTask,
    evaluate_expression,
    load_preference_jsonl,
    make_preference_dataset,
    synthetic_preference_pairs,
    tokenize_sft_example,
)
from grpo_jax.testing import tiny_tokenizer

R1 = re.compile(r"<think> (.*) </think> <answer> (.*) </answer>")
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def _examples(n=60):
    return ArithmeticTask(num_digits=(1, 2), operations=("+", "-", "*"), seed=0).split("train", n)


def _wrong_steps(think: str) -> list[str]:
    steps = think.split(" , ")
    return [s for s in steps if evaluate_expression(s.split("=")[0]) != int(s.split("=")[1])]


def test_synthetic_pairs_are_deterministic_and_balanced():
    examples = _examples()
    pairs = synthetic_preference_pairs(examples, seed=3)
    assert pairs == synthetic_preference_pairs(examples, seed=3)
    assert pairs != synthetic_preference_pairs(examples, seed=4)
    assert len(pairs) == len(examples)
    counts = {k: sum(p["kind"] == k for p in pairs) for k in ("wrong_answer", "malformed", "wrong_step")}
    assert counts == {"wrong_answer": 20, "malformed": 20, "wrong_step": 20}
    for pair, example in zip(pairs, examples, strict=True):
        assert pair["prompt"] == example["prompt"] and pair["chosen"] == example["completion"]
        assert pair["rejected"] != pair["chosen"] and pair["answer"] == example["answer"]
    only = synthetic_preference_pairs(examples, seed=3, kinds=("malformed",))
    assert {p["kind"] for p in only} == {"malformed"}
    with pytest.raises(ValueError, match="kinds must be"):
        synthetic_preference_pairs(examples, seed=0, kinds=("typo",))


def test_each_corruption_breaks_what_it_says():
    for pair in synthetic_preference_pairs(_examples(), seed=0):
        chosen_think, chosen_answer = R1.fullmatch(pair["chosen"]).groups()
        assert not _wrong_steps(chosen_think) and chosen_answer == pair["answer"]
        rejected = R1.fullmatch(pair["rejected"])
        if pair["kind"] == "malformed":  # same words, broken tags
            assert rejected is None
            words = lambda s: sorted(w for w in s.split() if w not in TAGS)
            assert words(pair["rejected"]) == words(pair["chosen"])
            assert not re.fullmatch(r"\s*<think>.*</think>\s*<answer>.*</answer>\s*", pair["rejected"])
            continue
        assert rejected is not None, pair["rejected"]  # format kept
        think, answer = rejected.groups()
        if pair["kind"] == "wrong_answer":
            assert think == chosen_think and re.fullmatch(r"\d+", answer) and answer != pair["answer"]
        else:  # wrong_step: one step's arithmetic is false, the final answer is untouched
            assert answer == pair["answer"] and len(_wrong_steps(think)) == 1
            assert len(think) == len(chosen_think)


def test_examples_without_a_usable_completion_are_skipped():
    examples = [
        {"prompt": "1+1", "answer": "2"},
        {"prompt": "1+1", "answer": "2", "completion": "2"},
        {"prompt": "x", "answer": "yes", "completion": "<think> no numbers </think> <answer> yes </answer>"},
    ]
    pairs = synthetic_preference_pairs(examples, seed=0, kinds=("wrong_step",))
    assert pairs == []  # wrong_step needs a number in the reasoning and is the only kind allowed
    pairs = synthetic_preference_pairs(examples, seed=0)
    assert [p["example_index"] for p in pairs] == [2] and pairs[0]["kind"] in ("wrong_answer", "malformed")


def test_load_preference_jsonl(tmp_path):
    good = tmp_path / "pairs.jsonl"
    good.write_text(
        json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "source": "x"}) + "\n\n"
        + json.dumps({"prompt": "q", "chosen": "c", "rejected": "d"}) + "\n"
    )  # fmt: skip
    pairs = load_preference_jsonl(good)
    assert [p["prompt"] for p in pairs] == ["p", "q"] and pairs[0]["source"] == "x"

    bad_lines = {
        '{"prompt": "p", "chosen": "a"}': r"missing field 'rejected'",
        '{"prompt": "p", "chosen": 3, "rejected": "b"}': r"field 'chosen' must be a string",
        '{"prompt": ': "invalid JSON",
        "[1, 2]": "expected a JSON object",
    }
    for line, problem in bad_lines.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n\n" + line + "\n")
        with pytest.raises(ValueError, match=re.escape(f"{bad}:3: ") + problem):
            load_preference_jsonl(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_preference_jsonl(empty)
    with pytest.raises(FileNotFoundError):
        load_preference_jsonl(tmp_path / "missing.jsonl")


def test_load_preference_pairs_from_parquet(tmp_path):
    """The same pairs from a Parquet file (one row per pair), with the same one-line errors by row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"prompt": ["p", "q"], "chosen": ["a", "c"], "rejected": ["b", "d"], "source": ["x", "y"]}
    good = tmp_path / "pairs.parquet"
    pq.write_table(pa.table(rows), good)
    pairs = load_preference_jsonl(good)
    assert [(p["prompt"], p["chosen"], p["rejected"], p["source"]) for p in pairs] == [
        ("p", "a", "b", "x"),
        ("q", "c", "d", "y"),
    ]
    no_column = tmp_path / "no_rejected.parquet"
    pq.write_table(pa.table({k: v for k, v in rows.items() if k != "rejected"}), no_column)
    with pytest.raises(ValueError, match=re.escape(f"{no_column}: missing column 'rejected'")):
        load_preference_jsonl(no_column)
    null = tmp_path / "null.parquet"
    pq.write_table(pa.table(dict(rows, chosen=["a", None])), null)
    with pytest.raises(ValueError, match=re.escape(f"{null}: row 1: field 'chosen' must be a string")):
        load_preference_jsonl(null)


def test_preference_batches_shapes_masks_and_resume():
    tokenizer = tiny_tokenizer()
    pairs = synthetic_preference_pairs(_examples(24), seed=0)
    kwargs = dict(template="raw", max_len=64, batch_size=4, seed=1)
    batch = next(iter(make_preference_dataset(pairs, tokenizer, **kwargs)))
    assert set(batch) == {
        "chosen_tokens",
        "chosen_attention_mask",
        "chosen_loss_mask",
        "rejected_tokens",
        "rejected_attention_mask",
        "rejected_loss_mask",
        "truncated",
        "example_index",
    }
    for side in ("chosen", "rejected"):
        assert batch[f"{side}_tokens"].shape == (4, 64) and batch[f"{side}_tokens"].dtype == np.int32
        for row, index in enumerate(batch["example_index"]):
            pair = pairs[index]
            expected = tokenize_sft_example(
                {"prompt": pair["prompt"], "completion": pair[side]}, tokenizer, "raw", 64
            )
            np.testing.assert_array_equal(batch[f"{side}_tokens"][row], expected["tokens"])
            np.testing.assert_array_equal(batch[f"{side}_loss_mask"][row], expected["loss_mask"])
            np.testing.assert_array_equal(batch[f"{side}_attention_mask"][row], expected["attention_mask"])
            n_real = int(batch[f"{side}_attention_mask"][row].sum())
            assert batch[f"{side}_tokens"][row, n_real - 1] == tokenizer.eos_id  # right-padded, EOS last
            assert batch[f"{side}_loss_mask"][row, n_real - 1] == 1
            completion = tokenizer.encode(pair[side], add_eos=True)
            assert int(batch[f"{side}_loss_mask"][row].sum()) == len(completion)
    assert batch["truncated"].dtype == np.bool_ and not batch["truncated"].any()
    short = next(iter(make_preference_dataset(pairs[:1], tokenizer, **dict(kwargs, max_len=8, batch_size=1))))
    assert short["truncated"].all()

    it = iter(make_preference_dataset(pairs, tokenizer, **kwargs))
    for _ in range(7):  # crosses an epoch boundary (24 pairs, 4 per batch)
        next(it)
    state = it.get_state()
    expected = next(it)
    resumed = iter(make_preference_dataset(pairs, tokenizer, **kwargs))
    resumed.set_state(state)
    got = next(resumed)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])

    shards = [
        next(iter(make_preference_dataset(pairs, tokenizer, **kwargs, shard_index=i, shard_count=2)))
        for i in range(2)
    ]
    assert all(s["chosen_tokens"].shape == (2, 64) for s in shards)
    np.testing.assert_array_equal(
        np.sort(np.concatenate([s["example_index"] for s in shards])), np.sort(batch["example_index"])
    )
