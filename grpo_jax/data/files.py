"""Tasks from JSONL or Parquet files: GSM8K style, MATH style, and prompt/completion SFT files.

JSONL: each line is one JSON object; blank lines are skipped. Parquet (how GSM8K, MATH and most Hugging
Face datasets are published): each row is one record, its columns the fields; it needs `pyarrow` (the
`[parquet]` extra) and is read one record batch at a time. The format follows the file's extension.
Every malformed record (bad JSON, a missing field or column, a null or non-string value, an answer that
cannot be extracted) raises one `ValueError` naming the file and the 1-based line number (JSONL) or the
0-based row index (Parquet, as `datasets` and pandas count rows), so a bad data file stops a run before
anything is trained or checkpointed.

Examples are the same dicts as the synthetic tasks: `{"prompt", "answer", "completion", "task", ...}` where
`completion` is the R1 format demonstration `<think> reasoning </think> <answer> answer </answer>` (for
cold-start SFT); the record's other fields are kept under their own names.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

Example = dict[str, Any]

KINDS = ("gsm8k", "math", "sft")
_DEFAULT_FIELDS = {
    "gsm8k": ("question", "answer"),
    "math": ("problem", "solution"),
    "sft": ("prompt", "completion"),
}
_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`) in `text`, braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:]
    brace = rest.find("{")
    command_end = len("\\boxed") if rest.startswith("\\boxed") else len("\\fbox")
    if rest[command_end : command_end + 1] == " ":  # \boxed 5
        match = re.match(r"\s+([^\s$]+)", rest[command_end:])
        return match.group(1) if match else None
    if brace != command_end:
        return None
    depth = 0
    for i in range(brace, len(rest)):
        if rest[i] == "{":
            depth += 1
        elif rest[i] == "}":
            depth -= 1
            if depth == 0:
                return rest[brace + 1 : i].strip()
    return None


def _gsm8k_answer(solution: str) -> tuple[str, str] | None:
    """`reasoning ... #### 1,234` -> ("1234", "reasoning ...") without the `<<a*b=c>>` calculator notes."""
    if "####" not in solution:
        return None
    reasoning, _, final = solution.rpartition("####")
    answer = final.strip().replace(",", "")
    if not answer:
        return None
    return answer, _CALCULATOR_ANNOTATION.sub("", reasoning).strip()


PARQUET_EXTENSIONS = (".parquet", ".pq")


def _jsonl_records(path: str) -> Iterator[tuple[str, Any]]:
    """(`path:line`, parsed JSON value) per non-blank line; bad JSON raises naming the line."""
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None


def _parquet_records(path: str, columns: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    """(`path: row i`, the row as a dict of every column) per row, one record batch in memory at a
    time; a file without one of `columns` raises naming it before any row is read."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"{path}: reading a Parquet task file needs pyarrow (pip install 'grpo_jax[parquet]')"
        ) from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid etc.: not a Parquet file, or a damaged one
        raise ValueError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())})") from None
    present = parquet.schema_arrow.names
    for column in columns:
        if column not in present:
            raise ValueError(f"{path}: missing column {column!r} (columns present: {sorted(present)})")
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield f"{path}: row {row}", record
            row += 1


def read_records(path: str, columns: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    """(where, record) per record of a JSONL or Parquet file (by extension); `where` is `path:line`
    (JSONL, 1-based) or `path: row i` (Parquet, 0-based), for one-line errors. A Parquet file without one
    of `columns` raises naming it before any row is read."""
    if path.lower().endswith(PARQUET_EXTENSIONS):
        return _parquet_records(path, columns)
    return _jsonl_records(path)


def _example(record: Any, kind: str, question_field: str, answer_field: str, task_name: str) -> Example:
    """One record -> an example; raises `ValueError(problem)` (without the location) if malformed."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    for field in (question_field, answer_field):
        if field not in record:
            raise ValueError(f"missing field {field!r} (fields present: {sorted(record)})")
        if not isinstance(record[field], str):
            raise ValueError(f"field {field!r} must be a string, got {type(record[field]).__name__}")
    question, target = record[question_field], record[answer_field]

    if kind == "gsm8k":
        parsed = _gsm8k_answer(target)
        if parsed is None:
            raise ValueError(f"field {answer_field!r} has no final answer after '####'")
        answer, reasoning = parsed
        completion = f"<think> {reasoning} </think> <answer> {answer} </answer>"
    elif kind == "math":
        answer = last_boxed(target)
        if answer is None:
            raise ValueError(f"field {answer_field!r} has no \\boxed{{...}} answer")
        completion = f"<think> {target.strip()} </think> <answer> {answer} </answer>"
    else:
        completion = target
        answer = record.get("answer")
        if answer is None:
            tagged = re.findall(r"<answer>(.*?)</answer>", completion, flags=re.DOTALL)
            answer = tagged[-1].strip() if tagged else ""
        answer = str(answer)

    extra = {k: v for k, v in record.items() if k not in (question_field, answer_field)}
    if "completion_segments" in extra:
        extra["completion_segments"] = _segments(extra["completion_segments"], completion)
    return {**extra, "prompt": question, "answer": answer, "completion": completion, "task": task_name}


def _segments(value: Any, completion: str) -> list[tuple[str, bool]]:
    """A record's `completion_segments` (`[[text, trainable], ...]`, e.g. a tool call, the tool's response
    with trainable false, the answer) checked: pairs of a string and a bool whose texts join to the
    completion, as the SFT tokenizer (`data/pipeline.py:completion_tokens`) expects."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"field 'completion_segments' must be a non-empty list, got {value!r}")
    segments = []
    for i, segment in enumerate(value):
        if not (
            isinstance(segment, list | tuple)
            and len(segment) == 2
            and isinstance(segment[0], str)
            and isinstance(segment[1], bool)
        ):
            raise ValueError(
                f"completion_segments[{i}] must be a [text, trainable (bool)] pair, got {segment!r}"
            )
        segments.append((segment[0], segment[1]))
    if "".join(text for text, _ in segments) != completion:
        raise ValueError("completion_segments: their texts joined differ from the record's completion")
    return segments


def load_jsonl_task(
    path: str | os.PathLike,
    *,
    kind: str = "gsm8k",
    question_field: str | None = None,
    answer_field: str | None = None,
    task_name: str | None = None,
) -> list[Example]:
    """Reads a task file, JSONL or Parquet (`.parquet`/`.pq`, by extension), into examples.

    Kinds (default field names in parentheses; in a Parquet file, column names):
      gsm8k (`question`, `answer`): the answer field ends with `#### N`; answer = N (commas removed),
        reasoning = the text before it without `<<...>>` calculator annotations.
      math (`problem`, `solution`): answer = content of the last `\\boxed{}`; reasoning = the solution.
      sft (`prompt`, `completion`): the completion is used as is; answer = the record's `answer` field if
        present, else the content of the completion's last `<answer> </answer>` block, else "". An
        optional `completion_segments` field, `[[text, trainable], ...]` joining to the completion, marks
        text the model must not learn to write (a tool's response in a tool-use demonstration: false).

    Raises:
      FileNotFoundError: no file at `path`.
      ImportError: a Parquet file without pyarrow installed.
      ValueError: `path:line: problem` (JSONL) or `path: row i: problem` (Parquet, 0-based) for the first
        malformed record, `path: missing column ...` for a Parquet file without a field, or the file has
        no records.
    """
    path = os.fspath(path)
    if kind not in KINDS:
        raise ValueError(f"Unknown task file kind {kind!r}; choose one of {KINDS}.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Task file not found: {path}")
    default_question, default_answer = _DEFAULT_FIELDS[kind]
    question_field = question_field or default_question
    answer_field = answer_field or default_answer
    task_name = task_name or kind

    examples = []
    for where, record in read_records(path, (question_field, answer_field)):
        try:
            examples.append(_example(record, kind, question_field, answer_field, task_name))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if not examples:
        raise ValueError(f"{path}: task file is empty (no records).")
    return examples
