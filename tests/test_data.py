"""Data: templates, synthetic tasks, JSONL task files, grain pipelines, rejection-sampling SFT writer."""

import json
import re

import numpy as np
import pytest

from grpo_jax.data import (
    R1_ZERO_TEMPLATE,
    TASKS,
    ArithmeticTask,
    CountdownTask,
    countdown_solution_is_valid,
    evaluate_expression,
    format_prompt,
    last_boxed,
    load_jsonl_task,
    make_prompt_dataset,
    make_sft_dataset,
    prompt_length_stats,
    tokenize_prompt,
    write_rejection_sft,
)
from grpo_jax.data.tasks import addition_steps, multiplication_steps, subtraction_steps
from grpo_jax.tokenizers import train_sentencepiece

# --------------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------------


def test_templates():
    text = format_prompt("r1_zero", "23+58")
    assert text == R1_ZERO_TEMPLATE.replace("{prompt}", "23+58")
    assert text == (  # DeepSeek-R1 Table 1, verbatim
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
        "The assistant first thinks about the reasoning process in the mind and then provides the user with "
        "the answer. The reasoning process and answer are enclosed within <think> </think> and "
        "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
        "<answer> answer here </answer>. User: 23+58. Assistant:"
    )
    assert format_prompt("plain", "What is $\\frac{1}{2}$?") == "Question: What is $\\frac{1}{2}$?\nAnswer:"
    with pytest.raises(ValueError, match="Unknown prompt template 'nope'"):
        format_prompt("nope", "x")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        format_prompt("chat", "x")


# --------------------------------------------------------------------------------------------------
# Synthetic tasks
# --------------------------------------------------------------------------------------------------


def test_arithmetic_steps_exact():
    assert addition_steps([23, 58]) == (["3+8+0=11", "2+5+1=8"], 81)
    assert addition_steps([99, 5, 7]) == (["9+5+7+0=21", "9+0+0+2=11"], 111)
    assert subtraction_steps(52, 38) == (["12-8-0=4", "5-3-1=1"], 14)
    assert subtraction_steps(100, 1) == (["10-1-0=9", "10-0-1=9", "1-0-1=0"], 99)
    assert multiplication_steps(23, 58) == (["23*8=184", "23*50=1150", "184+1150=1334"], 1334)
    assert multiplication_steps(7, 6) == (["7*6=42"], 42)


def _check_demonstration(example):
    match = re.fullmatch(r"<think> (.*) </think> <answer> (.*) </answer>", example["completion"])
    assert match, example["completion"]
    steps, answer = match.group(1).split(" , "), match.group(2)
    assert answer == example["answer"]
    for step in steps:
        lhs, rhs = step.split("=")
        assert evaluate_expression(lhs) == int(rhs), step
    return steps


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_digits=(1, 2), operations=("+", "-", "*")),
        dict(num_digits=(2, 4), operations=("+",), num_operands=(2, 3)),  # sampled, not enumerated
        dict(num_digits=3, operations=("-", "*")),
    ],
)
def test_arithmetic_demonstrations_are_correct(kwargs):
    task = ArithmeticTask(seed=3, **kwargs)
    for example in task.split("train", 150) + task.split("test", 50):
        assert example["task"] == "arithmetic"
        assert int(example["answer"]) == evaluate_expression(example["prompt"])
        steps = _check_demonstration(example)
        if example["operation"] == "+":  # the answer is read off the column steps
            sums = [int(s.split("=")[1]) for s in steps]
            digits = "".join(str(s % 10) for s in reversed(sums))
            assert str(int(str(sums[-1] // 10) + digits)) == example["answer"]


def test_arithmetic_is_deterministic_and_prefix_stable():
    a = ArithmeticTask(num_digits=(1, 2), seed=7)
    b = ArithmeticTask(num_digits=(1, 2), seed=7)
    assert a.split("train", 200) == b.split("train", 200)
    assert a.split("train", 50) == a.split("train", 200)[:50]
    assert ArithmeticTask(num_digits=(1, 2), seed=8).split("train", 50) != a.split("train", 50)
    sampled = ArithmeticTask(num_digits=(3, 5), seed=7)
    assert sampled.split("test", 30) == ArithmeticTask(num_digits=(3, 5), seed=7).split("test", 60)[:30]


def _canonical_arithmetic(example):
    operands = example["operands"]
    if example["operation"] in "+*":
        operands = sorted(operands)
    return example["operation"], tuple(operands)


@pytest.mark.parametrize(
    "kwargs", [dict(num_digits=(1, 2), operations=("+", "*")), dict(num_digits=(2, 3), num_operands=(2, 3))]
)
def test_arithmetic_splits_are_disjoint(kwargs):
    test = set()
    for seed in (0, 1, 2):
        test |= {_canonical_arithmetic(e) for e in ArithmeticTask(seed=seed, **kwargs).split("test", 150)}
    for seed in (0, 1, 2):
        for size in (10, 400, 1500):
            train = ArithmeticTask(seed=seed, **kwargs).split("train", size)
            assert len(train) == size
            assert len({(e["operation"], tuple(e["operands"])) for e in train}) == size
            assert not {_canonical_arithmetic(e) for e in train} & test


def test_arithmetic_size_and_argument_errors():
    task = ArithmeticTask(num_digits=1, operations=("+",))
    available = len(task.split("train", 0)) + len(task._enumerated_split("train"))
    assert available + len(task._enumerated_split("test")) == 100
    with pytest.raises(ValueError, match=rf"asked for 101 examples but only {available} distinct"):
        task.split("train", 101)
    with pytest.raises(ValueError, match="Unknown split 'valid'"):
        task.split("valid", 1)
    with pytest.raises(ValueError, match="operations"):
        ArithmeticTask(operations=("/",))
    with pytest.raises(ValueError, match="num_digits"):
        ArithmeticTask(num_digits=(3, 1))


def test_countdown_problems_and_splits():
    assert TASKS["countdown"] is CountdownTask and TASKS["arithmetic"] is ArithmeticTask
    train = CountdownTask(seed=0).split("train", 300)
    assert train == CountdownTask(seed=0).split("train", 300)
    for example in train:
        assert 3 <= len(example["numbers"]) <= 4 and 1 <= example["target"] <= 100
        assert all(1 <= n <= 100 for n in example["numbers"])
        assert countdown_solution_is_valid(example["answer"], example["numbers"], example["target"])
        assert f"create an equation that equals {example['target']}." in example["prompt"]
        steps = _check_demonstration(example)
        assert len(steps) == len(example["numbers"]) - 1
        assert int(steps[-1].split("=")[1]) == example["target"]
    key = lambda e: (tuple(sorted(e["numbers"])), e["target"])  # noqa: E731
    assert len({key(e) for e in train}) == 300
    test = {key(e) for seed in (0, 1) for e in CountdownTask(seed=seed).split("test", 100)}
    assert not {key(e) for e in train} & test


def test_countdown_validity_checker():
    assert evaluate_expression("(44-19)*3+7") == 82
    assert countdown_solution_is_valid("(44 - 19) * 3 + 7", [3, 7, 19, 44], 82)
    assert not countdown_solution_is_valid("(44-19)*3+7", [3, 7, 19, 44], 81)
    assert not countdown_solution_is_valid("(44-19)*3", [3, 7, 19, 44], 75)  # 7 unused
    assert not countdown_solution_is_valid("44-19+19", [44, 19], 44)  # 19 used twice
    assert not countdown_solution_is_valid("__import__('os')", [1], 1)
    assert not countdown_solution_is_valid("4/(2-2)", [4, 2, 2], 1)


# --------------------------------------------------------------------------------------------------
# JSONL task files
# --------------------------------------------------------------------------------------------------


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_gsm8k_file(tmp_path):
    rows = [
        {
            "question": "Natalia sold 48 clips and half as many later. Total?",
            "answer": "48/2 = <<48/2=24>>24\n#### 72",
        },
        {"question": "Big?", "answer": "a lot\n#### 1,234", "id": 7},
    ]
    path = _write_lines(
        tmp_path / "gsm.jsonl", [json.dumps(r) for r in rows[:1]] + [""] + [json.dumps(rows[1])]
    )
    examples = load_jsonl_task(path)
    assert examples[0] == {
        "prompt": rows[0]["question"],
        "answer": "72",
        "completion": "<think> 48/2 = 24 </think> <answer> 72 </answer>",
        "task": "gsm8k",
    }
    assert examples[1]["answer"] == "1234" and examples[1]["id"] == 7


def test_math_file_and_boxed(tmp_path):
    assert last_boxed("so \\boxed{1} then \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert last_boxed("\\boxed 5$") == "5"
    assert last_boxed("\\fbox{x^{2}}") == "x^{2}"
    assert last_boxed("\\boxed{unclosed") is None and last_boxed("none") is None
    row = {"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 1"}
    path = _write_lines(tmp_path / "math.jsonl", [json.dumps(row)])
    (example,) = load_jsonl_task(path, kind="math")
    assert example["answer"] == "\\frac{1}{2}" and example["level"] == "Level 1"
    assert (
        example["completion"]
        == "<think> It is $\\boxed{\\frac{1}{2}}$. </think> <answer> \\frac{1}{2} </answer>"
    )
    custom = _write_lines(tmp_path / "custom.jsonl", [json.dumps({"q": "Q?", "s": "\\boxed{3}"})])
    assert load_jsonl_task(custom, kind="math", question_field="q", answer_field="s")[0]["answer"] == "3"


@pytest.mark.parametrize(
    "bad_line, kind, problem",
    [
        ('{"question": "q", "answer": "x #### 1"', "gsm8k", "invalid JSON"),
        ('{"question": "q"}', "gsm8k", "missing field 'answer'"),
        (
            '{"question": "q", "answer": "no final answer"}',
            "gsm8k",
            "field 'answer' has no final answer after '####'",
        ),
        ('{"question": "q", "answer": 5}', "gsm8k", "field 'answer' must be a string"),
        ('["not", "an", "object"]', "gsm8k", "expected a JSON object"),
        ('{"problem": "p", "solution": "no box"}', "math", "field 'solution' has no \\\\boxed"),
        ('{"prompt": "p"}', "sft", "missing field 'completion'"),
    ],
)
def test_malformed_line_names_file_line_and_problem(tmp_path, bad_line, kind, problem):
    good = {
        "gsm8k": '{"question": "q", "answer": "r #### 2"}',
        "math": '{"problem": "p", "solution": "\\\\boxed{2}"}',
        "sft": '{"prompt": "p", "completion": "c"}',
    }[kind]
    path = _write_lines(tmp_path / "bad.jsonl", [good, "", bad_line, good])
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + problem):
        load_jsonl_task(path, kind=kind)


def test_empty_and_missing_files(tmp_path):
    empty = _write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match=re.escape(f"{empty}: task file is empty")):
        load_jsonl_task(empty)
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        load_jsonl_task(tmp_path / "nothere.jsonl")
    with pytest.raises(ValueError, match="Unknown task file kind"):
        load_jsonl_task(empty, kind="csv")


# --------------------------------------------------------------------------------------------------
# Parquet task files (how GSM8K, MATH and DAPO-Math are published): the same examples and errors
# --------------------------------------------------------------------------------------------------


def _write_parquet(path, columns: dict):
    """A Parquet file of `columns` (name -> list of values), written in two row groups so reads span them."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table(columns)
    pq.write_table(table, path, row_group_size=max(1, (table.num_rows + 1) // 2))
    return path


GSM8K_ROWS = [
    {
        "question": "Natalia sold 48 clips and half as many later. Total?",
        "answer": "48/2 = <<48/2=24>>24\n#### 72",
    },
    {"question": "Big?", "answer": "a lot\n#### 1,234"},
    {"question": "Small?", "answer": "none\n#### 0"},
]


@pytest.mark.parametrize(
    "kind, rows, fields",
    [
        ("gsm8k", GSM8K_ROWS, {}),
        (
            "math",
            [
                {"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 1"},
                {"problem": "1+1?", "solution": "\\boxed{2}", "level": "Level 2"},
            ],
            {},
        ),
        (
            "sft",
            [{"prompt": "p", "completion": "c <answer> 4 </answer>"}, {"prompt": "q", "completion": "d"}],
            {},
        ),
        ("math", [{"q": "Q?", "s": "\\boxed{3}", "id": 1}], {"question_field": "q", "answer_field": "s"}),
    ],
)
def test_parquet_file_gives_the_jsonl_files_examples(tmp_path, kind, rows, fields):
    jsonl = _write_lines(tmp_path / "task.jsonl", [json.dumps(r) for r in rows])
    columns = {name: [r[name] for r in rows] for name in rows[0]}
    parquet = _write_parquet(tmp_path / "task.parquet", columns)
    from_jsonl = load_jsonl_task(jsonl, kind=kind, **fields)
    from_parquet = load_jsonl_task(parquet, kind=kind, **fields)
    assert from_parquet == from_jsonl
    assert len(from_parquet) == len(rows) and from_parquet[0]["task"] == kind


def test_parquet_task_file_drives_build_task(tmp_path):
    """config.task.train_file/test_file may be Parquet, as for GSM8K's published train/test splits."""
    import ml_collections

    from grpo_jax.training.setup import build_task

    columns = {name: [r[name] for r in GSM8K_ROWS] for name in GSM8K_ROWS[0]}
    train = _write_parquet(tmp_path / "train-00000-of-00001.parquet", columns)
    test = _write_parquet(tmp_path / "test.parquet", columns)
    config = ml_collections.ConfigDict(
        dict(
            seed=0,
            task=dict(
                name="gsm8k", train_file=str(train), test_file=str(test), train_size=2, test_size=0, kwargs={}
            ),
        )
    )
    task = build_task(config)
    assert [e["answer"] for e in task.train] == ["72", "1234"] and len(task.test) == 3


@pytest.mark.parametrize(
    "columns, problem",
    [
        ({"question": ["q", "r"]}, "missing column 'answer' \\(columns present: \\['question'\\]\\)"),
        (
            {"question": ["q", "r", "s"], "answer": ["x #### 1", None, "y #### 3"]},
            "row 1: field 'answer' must be a string, got NoneType",
        ),
        (
            {"question": ["q", "r", "s"], "answer": ["x #### 1", "y #### 2", "no final"]},
            "row 2: field 'answer' has no final answer after '####'",
        ),
        (
            {"question": [1, 2], "answer": ["x #### 1", "y #### 2"]},
            "row 0: field 'question' must be a string, got int",
        ),
    ],
    ids=["missing-column", "null-value", "no-answer", "not-a-string"],
)
def test_malformed_parquet_names_file_and_column_or_row(tmp_path, columns, problem):
    path = _write_parquet(tmp_path / "bad.parquet", columns)
    with pytest.raises(ValueError, match=re.escape(f"{path}: ") + problem) as error:
        load_jsonl_task(path)
    assert "\n" not in str(error.value)


def test_unreadable_and_empty_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_text('{"question": "q", "answer": "x #### 1"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{not_parquet}: not a readable Parquet file (")):
        load_jsonl_task(not_parquet)
    empty = _write_parquet(tmp_path / "empty.parquet", {"question": [], "answer": []})
    with pytest.raises(ValueError, match=re.escape(f"{empty}: task file is empty")):
        load_jsonl_task(empty)


def test_parquet_without_pyarrow_is_one_clear_line(tmp_path, monkeypatch):
    import sys

    path = tmp_path / "task.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import raises ImportError
    with pytest.raises(ImportError, match=re.escape(f"{path}: reading a Parquet task file needs pyarrow")):
        load_jsonl_task(path)


# --------------------------------------------------------------------------------------------------
# grain pipelines
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arithmetic():
    return ArithmeticTask(num_digits=(1, 2), seed=0).split("train", 10)


@pytest.fixture(scope="module")
def tokenizer(arithmetic):
    texts = [format_prompt("r1_zero", e["prompt"]) + " " + e["completion"] for e in arithmetic]
    return train_sentencepiece(texts, vocab_size=72)


def _indices(batches):
    return [b["example_index"].tolist() for b in batches]


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_prompt_batches(arithmetic, tokenizer):
    longest = prompt_length_stats(arithmetic, tokenizer, template="r1_zero", max_prompt_len=1)[
        "max_prompt_tokens"
    ]
    ds = make_prompt_dataset(
        arithmetic,
        tokenizer,
        template="r1_zero",
        max_prompt_len=longest + 3,
        batch_size=4,
        seed=0,
        max_answer_len=6,
    )
    batch = next(iter(ds))
    assert batch["prompt_tokens"].shape == (4, longest + 3) and batch["prompt_tokens"].dtype == np.int32
    assert batch["prompt_mask"].dtype == np.int32 and batch["prompt_truncated"].dtype == np.bool_
    assert batch["answer_tokens"].shape == (4, 6) and batch["example_index"].dtype == np.int32
    for row in range(4):
        example = arithmetic[batch["example_index"][row]]
        tokens, mask = batch["prompt_tokens"][row], batch["prompt_mask"][row]
        length = int(mask.sum())
        assert mask[-length:].all() and not mask[:-length].any()  # left padded
        assert (tokens[:-length] == tokenizer.pad_id).all() and tokens[-length] == tokenizer.bos_id
        assert tokenizer.decode(tokens, skip_special=True) == format_prompt("r1_zero", example["prompt"])
        answer = batch["answer_tokens"][row][batch["answer_mask"][row] == 1]
        assert tokenizer.decode(answer) == example["answer"]
        assert list(answer) == tokenizer.encode(f"<answer> {example['answer']} </answer>")[2:-2]
    assert not batch["prompt_truncated"].any() and not batch["answer_truncated"].any()


def test_epochs_shuffle_and_determinism(arithmetic, tokenizer):
    kwargs = dict(template="raw", max_prompt_len=8, batch_size=5, seed=3)
    first = _take(iter(make_prompt_dataset(arithmetic, tokenizer, **kwargs)), 6)
    again = _take(iter(make_prompt_dataset(arithmetic, tokenizer, **kwargs)), 6)
    for a, b in zip(first, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    epochs = [sum(_indices(first[i : i + 2]), []) for i in (0, 2, 4)]
    for order in epochs:
        assert sorted(order) == list(range(10))  # every example once per epoch
    assert len({tuple(order) for order in epochs}) == 3  # a new order each epoch
    other_seed = _take(iter(make_prompt_dataset(arithmetic, tokenizer, **{**kwargs, "seed": 4})), 2)
    assert _indices(other_seed) != _indices(first[:2])
    unshuffled = make_prompt_dataset(arithmetic, tokenizer, **kwargs, shuffle=False)
    assert _indices(_take(iter(unshuffled), 3)) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("consumed", [1, 2, 3])
def test_resume_from_iterator_state(arithmetic, tokenizer, consumed):
    """batch_size 4 over 10 examples: batch 2 straddles the first epoch boundary, batch 3 lies in epoch 2."""
    ds = make_prompt_dataset(arithmetic, tokenizer, template="raw", max_prompt_len=8, batch_size=4, seed=1)
    iterator = iter(ds)
    _take(iterator, consumed)
    state = iterator.get_state()
    expected = _take(iterator, 2)
    resumed = iter(ds)
    resumed.set_state(json.loads(json.dumps(state)))  # the state survives a JSON round trip
    for want, got in zip(expected, _take(resumed, 2), strict=True):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_finite_epochs_and_shards(arithmetic, tokenizer):
    kwargs = dict(template="raw", max_prompt_len=8, seed=5)
    single = list(make_prompt_dataset(arithmetic, tokenizer, batch_size=4, num_epochs=1, **kwargs))
    assert len(single) == 2  # 10 examples, drop_remainder
    globals_ = _take(iter(make_prompt_dataset(arithmetic, tokenizer, batch_size=4, **kwargs)), 5)
    shards = [
        _take(
            iter(
                make_prompt_dataset(
                    arithmetic, tokenizer, batch_size=4, shard_index=i, shard_count=2, **kwargs
                )
            ),
            5,
        )
        for i in range(2)
    ]
    for step in range(5):
        rows = [shards[i][step]["example_index"].tolist() for i in range(2)]
        assert len(rows[0]) == len(rows[1]) == 2 and not set(rows[0]) & set(rows[1])
        assert sorted(rows[0] + rows[1]) == sorted(globals_[step]["example_index"].tolist())
    covered = sum((shards[i][step]["example_index"].tolist() for i in range(2) for step in range(5)), [])
    assert sorted(covered) == sorted(list(range(10)) * 2)  # five global batches of 4 = two epochs
    finite = [
        list(
            make_prompt_dataset(
                arithmetic, tokenizer, batch_size=4, num_epochs=3, shard_index=i, shard_count=4, **kwargs
            )
        )
        for i in range(4)
    ]
    assert [len(f) for f in finite] == [7, 7, 7, 7]  # 30 examples -> 7 global batches, same count everywhere
    with pytest.raises(ValueError, match="multiple of shard_count=3"):
        make_prompt_dataset(arithmetic, tokenizer, batch_size=4, shard_count=3, **kwargs)
    with pytest.raises(ValueError, match="do not fill one batch"):
        make_prompt_dataset(arithmetic, tokenizer, batch_size=16, num_epochs=1, **kwargs)


def test_prompt_truncation_keeps_bos_and_end(arithmetic, tokenizer):
    example = arithmetic[0]
    full = tokenizer.encode(format_prompt("r1_zero", example["prompt"]), add_bos=True)
    tokens, mask, truncated = tokenize_prompt(example, tokenizer, "r1_zero", 12)
    assert truncated and mask.tolist() == [1] * 12
    assert tokens.tolist() == full[:1] + full[-11:]
    assert tokenizer.decode(tokens, skip_special=True) == f"{example['prompt']}. Assistant:"
    stats = prompt_length_stats(arithmetic, tokenizer, template="r1_zero", max_prompt_len=len(full))
    assert stats["max_prompt_tokens"] >= len(full) and stats["num_examples"] == 10
    longest = stats["max_prompt_tokens"]
    lengths = [len(tokenizer.encode(format_prompt("r1_zero", e["prompt"]), add_bos=True)) for e in arithmetic]
    assert stats["num_truncated_prompts"] == sum(n > len(full) for n in lengths)
    assert (
        prompt_length_stats(arithmetic, tokenizer, template="r1_zero", max_prompt_len=longest)[
            "num_truncated_prompts"
        ]
        == 0
    )
    batch = next(
        iter(
            make_prompt_dataset(
                arithmetic, tokenizer, template="r1_zero", max_prompt_len=12, batch_size=4, seed=0
            )
        )
    )
    assert batch["prompt_truncated"].all()


def test_sft_batches(arithmetic, tokenizer):
    ds = make_sft_dataset(arithmetic, tokenizer, template="raw", max_len=48, batch_size=2, seed=0)
    batch = next(iter(ds))
    assert batch["tokens"].shape == batch["loss_mask"].shape == batch["attention_mask"].shape == (2, 48)
    for row in range(2):
        example = arithmetic[batch["example_index"][row]]
        tokens, loss_mask, attention = (
            batch["tokens"][row],
            batch["loss_mask"][row],
            batch["attention_mask"][row],
        )
        prompt = tokenizer.encode(example["prompt"], add_bos=True)
        completion = tokenizer.encode(example["completion"], add_eos=True)
        length = len(prompt) + len(completion)
        assert tokens[:length].tolist() == prompt + completion and (tokens[length:] == tokenizer.pad_id).all()
        assert attention.tolist() == [1] * length + [0] * (48 - length)
        assert loss_mask.tolist() == [0] * len(prompt) + [1] * len(completion) + [0] * (48 - length)
        assert tokenizer.decode(tokens[loss_mask == 1], skip_special=True) == example["completion"]
    assert not batch["truncated"].any()
    short = next(
        iter(make_sft_dataset(arithmetic, tokenizer, template="raw", max_len=12, batch_size=2, seed=0))
    )
    assert short["truncated"].all() and short["attention_mask"].all()
    assert (short["tokens"][:, -1] != tokenizer.eos_id).all()


# --------------------------------------------------------------------------------------------------
# Rejection-sampling SFT writer
# --------------------------------------------------------------------------------------------------


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rejection_filter_dedupe_and_cap(tmp_path):
    prompts = ["p1"] * 5 + ["p2"] * 3
    completions = ["a", "a", "b", "c", "d", "x", "y", "z"]
    rewards = [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, np.nan, 0.5]
    stats = write_rejection_sft(
        tmp_path / "out.jsonl", prompts, completions, rewards, max_per_prompt=2, seed=0
    )
    assert stats == {
        "num_candidates": 8,
        "num_above_threshold": 5,  # p1:a,a,b,d  p2:x
        "num_duplicates": 1,
        "num_capped": 1,  # p1 keeps 2 of a,b,d
        "num_reasoning": 3,
        "num_non_reasoning": 0,
        "num_written": 3,
        "ratio": None,
    }
    rows = _read(tmp_path / "out.jsonl")
    assert {r["source"] for r in rows} == {"reasoning"}
    pairs = {(r["prompt"], r["completion"]) for r in rows}
    assert ("p2", "x") in pairs and len([p for p in pairs if p[0] == "p1"]) == 2
    assert pairs <= {("p1", "a"), ("p1", "b"), ("p1", "d"), ("p2", "x")}
    again = write_rejection_sft(
        tmp_path / "again.jsonl", prompts, completions, rewards, max_per_prompt=2, seed=0
    )
    assert again == stats and (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "out.jsonl").read_bytes()
    kept = write_rejection_sft(
        tmp_path / "all.jsonl", prompts, completions, rewards, threshold=0.5, dedupe=False
    )
    assert kept["num_reasoning"] == 6 and kept["num_duplicates"] == 0


@pytest.mark.parametrize(
    "num_reasoning, num_other, want", [(12, 2, (6, 2)), (12, 10, (12, 4)), (9, 3, (9, 3))]
)
def test_rejection_mixing_ratio(tmp_path, num_reasoning, num_other, want):
    prompts = [f"q{i}" for i in range(num_reasoning)]
    other = [{"prompt": f"chat{i}", "completion": f"hello {i}"} for i in range(num_other)]
    other.append(dict(other[0]))  # a duplicate, removed
    path = tmp_path / "mix.jsonl"
    stats = write_rejection_sft(
        path, prompts, ["ok"] * num_reasoning, [1.0] * num_reasoning, non_reasoning=other
    )
    assert (stats["num_reasoning"], stats["num_non_reasoning"]) == want
    assert stats["ratio"] == want[0] / want[1]
    rows = _read(path)
    assert [r["source"] for r in rows].count("non_reasoning") == want[1]
    examples = load_jsonl_task(path, kind="sft")
    assert len(examples) == sum(want) and {e["source"] for e in examples} == {"reasoning", "non_reasoning"}
    with pytest.raises(ValueError, match="differ in length"):
        write_rejection_sft(path, prompts, ["ok"], [1.0] * num_reasoning)


def test_sft_file_completion_segments(tmp_path, tokenizer):
    """A tool-use demonstration in an SFT file: its `completion_segments` reach the SFT tokenizer (the
    response's tokens untrainable), and a malformed one names the file and line."""
    from grpo_jax.data.pipeline import completion_tokens

    call, response, answer = "<tool_call>1+2</tool_call>", " 3 ", " <answer> 3 </answer>"
    record = {
        "prompt": "1+2",
        "completion": call + response + answer,
        "completion_segments": [[call, True], [response, False], [answer, True]],
    }
    path = tmp_path / "tool_sft.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (example,) = load_jsonl_task(path, kind="sft")
    assert example["answer"] == "3"
    ids, trainable = completion_tokens(example, tokenizer)
    assert len(ids) == len(trainable) and 0 in trainable
    assert [i for i, t in zip(ids, trainable, strict=True) if not t] == tokenizer.encode(response)
    for bad, message in [
        ([[call, True], [response, "no"], [answer, True]], r"completion_segments\[1\] must be a \[text"),
        ([[call, True], [answer, True]], "texts joined differ"),
        ([], "non-empty list"),
    ]:
        path.write_text(json.dumps(record) + "\n" + json.dumps({**record, "completion_segments": bad}) + "\n")
        with pytest.raises(ValueError, match=f"tool_sft.jsonl:2: .*{message}"):
            load_jsonl_task(path, kind="sft")


def test_pad_operands_changes_only_the_prompt_text():
    from grpo_jax.data.tasks import ArithmeticTask

    plain = ArithmeticTask(num_digits=(1, 3), seed=3).split("train", 50)
    padded = ArithmeticTask(num_digits=(1, 3), seed=3, pad_operands=True).split("train", 50)
    for a, b in zip(plain, padded, strict=True):
        assert (a["answer"], a["completion"], a["operands"]) == (b["answer"], b["completion"], b["operands"])
        assert b["prompt"] == "+".join(f"{x:03d}" for x in a["operands"])


def test_task_seed_fixes_the_problems_while_the_run_seed_varies():
    """config.task.seed draws the problems; without it (or negative) the run's seed does."""
    import ml_collections

    from grpo_jax.training.setup import build_task

    def problems(run_seed, **task_seed):
        task = dict(name="arithmetic", kwargs={}, train_size=20, test_size=5, **task_seed)
        task = build_task(ml_collections.ConfigDict(dict(seed=run_seed, task=task)))
        return [e["prompt"] for e in task.train + task.test]

    assert problems(0) != problems(1)
    assert problems(0, seed=-1) == problems(0)
    assert problems(1, seed=0) == problems(2, seed=0) == problems(0)
    with pytest.raises(ValueError, match=r"config.task.seed='0': expected an int"):
        problems(0, seed="0")
