"""Prompt templates: how a task's question becomes the text the policy continues.

A template is either a string with a `{prompt}` placeholder or a callable `(tokenizer, prompt) -> str`.
Substitution is a plain `str.replace`, so prompts with braces (LaTeX in MATH) are safe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# DeepSeek-R1 (arXiv 2501.12948) Table 1, the R1-Zero template, verbatim.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>. User: {prompt}. Assistant:"
)

PLAIN_TEMPLATE = "Question: {prompt}\nAnswer:"

RAW_TEMPLATE = "{prompt}"


def chat_template(tokenizer: Any, prompt: str) -> str:
    """One user turn rendered with the tokenizer's native chat template, ending with the assistant header."""
    apply = getattr(tokenizer, "apply_chat_template", None)
    if apply is None:
        raise ValueError(
            "template 'chat' needs a tokenizer with a chat template (an HFTokenizer); "
            f"got {type(tokenizer).__name__}."
        )
    return apply([{"role": "user", "content": prompt}], add_generation_prompt=True)


TEMPLATES: dict[str, str | Callable[[Any, str], str]] = {
    "r1_zero": R1_ZERO_TEMPLATE,
    "plain": PLAIN_TEMPLATE,
    "raw": RAW_TEMPLATE,
    "chat": chat_template,
}


def format_prompt(name: str, prompt: str, tokenizer: Any = None) -> str:
    """The text of `prompt` under template `name` (a key of TEMPLATES)."""
    if name not in TEMPLATES:
        raise ValueError(f"Unknown prompt template {name!r}; choose one of {sorted(TEMPLATES)}.")
    template = TEMPLATES[name]
    if callable(template):
        if tokenizer is None:
            raise ValueError(f"template {name!r} needs a tokenizer.")
        return template(tokenizer, prompt)
    return template.replace("{prompt}", prompt)
