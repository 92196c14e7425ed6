"""Tasks from JSONL files: GSM8K style, MATH style, and prompt/completion SFT files.

Each line is one JSON object. Every malformed line (bad JSON, a missing field, an answer that cannot be
extracted) raises one `ValueError` naming the file and the 1-based line number, so a bad data file stops a run
before anything is trained or checkpointed. Blank lines are skipped.

Examples are the same dicts as the synthetic tasks: `{"prompt", "answer", "completion", "task", ...}` where
`completion` is the R1 format demonstration `<think> reasoning </think> <answer> answer </answer>` (for
cold-start SFT); the record's other fields are kept under their own names.
"""

from __future__ import annotations

import json
import os
import re
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


def load_jsonl_task(
    path: str | os.PathLike,
    *,
    kind: str = "gsm8k",
    question_field: str | None = None,
    answer_field: str | None = None,
    task_name: str | None = None,
) -> list[Example]:
    """Reads a JSONL task file into examples.

    Kinds (default field names in parentheses):
      gsm8k (`question`, `answer`): the answer field ends with `#### N`; answer = N (commas removed),
        reasoning = the text before it without `<<...>>` calculator annotations.
      math (`problem`, `solution`): answer = content of the last `\\boxed{}`; reasoning = the solution.
      sft (`prompt`, `completion`): the completion is used as is; answer = the record's `answer` field if
        present, else the content of the completion's last `<answer> </answer>` block, else "".

    Raises:
      FileNotFoundError: no file at `path`.
      ValueError: `path:line: problem` for the first malformed line, or the file has no records.
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
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue

            def fail(problem: str, line_number: int = line_number) -> ValueError:
                return ValueError(f"{path}:{line_number}: {problem}")

            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise fail(f"invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise fail(f"expected a JSON object, got {type(record).__name__}")
            for field in (question_field, answer_field):
                if field not in record:
                    raise fail(f"missing field {field!r} (fields present: {sorted(record)})")
                if not isinstance(record[field], str):
                    raise fail(f"field {field!r} must be a string, got {type(record[field]).__name__}")
            question, target = record[question_field], record[answer_field]

            if kind == "gsm8k":
                parsed = _gsm8k_answer(target)
                if parsed is None:
                    raise fail(f"field {answer_field!r} has no final answer after '####'")
                answer, reasoning = parsed
                completion = f"<think> {reasoning} </think> <answer> {answer} </answer>"
            elif kind == "math":
                answer = last_boxed(target)
                if answer is None:
                    raise fail(f"field {answer_field!r} has no \\boxed{{...}} answer")
                completion = f"<think> {target.strip()} </think> <answer> {answer} </answer>"
            else:
                completion = target
                answer = record.get("answer")
                if answer is None:
                    tagged = re.findall(r"<answer>(.*?)</answer>", completion, flags=re.DOTALL)
                    answer = tagged[-1].strip() if tagged else ""
                answer = str(answer)

            extra = {k: v for k, v in record.items() if k not in (question_field, answer_field)}
            examples.append(
                {**extra, "prompt": question, "answer": answer, "completion": completion, "task": task_name}
            )
    if not examples:
        raise ValueError(f"{path}: task file is empty (no JSON records).")
    return examples
