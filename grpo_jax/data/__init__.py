"""Data: prompt templates, synthetic and file tasks, grain pipelines, the rejection-sampling SFT writer."""

from grpo_jax.data.files import last_boxed, load_jsonl_task
from grpo_jax.data.pipeline import (
    completion_tokens,
    make_prompt_dataset,
    make_sft_dataset,
    prompt_length_stats,
    sft_length_stats,
    tokenize_answer,
    tokenize_prompt,
    tokenize_sft_example,
)
from grpo_jax.data.preferences import (
    CORRUPTIONS,
    load_preference_jsonl,
    make_preference_dataset,
    preference_length_stats,
    synthetic_preference_pairs,
    tokenize_preference_pair,
)
from grpo_jax.data.rejection import write_rejection_sft
from grpo_jax.data.tasks import (
    TASKS,
    ArithmeticTask,
    CountdownTask,
    Example,
    MultiplicationTask,
    countdown_solution_is_valid,
    evaluate_expression,
    task_special_symbols,
)
from grpo_jax.data.templates import (
    PLAIN_TEMPLATE,
    R1_ZERO_TEMPLATE,
    TEMPLATES,
    chat_template,
    format_prompt,
)

__all__ = [
    "CORRUPTIONS",
    "PLAIN_TEMPLATE",
    "R1_ZERO_TEMPLATE",
    "TASKS",
    "TEMPLATES",
    "ArithmeticTask",
    "CountdownTask",
    "Example",
    "MultiplicationTask",
    "chat_template",
    "completion_tokens",
    "countdown_solution_is_valid",
    "evaluate_expression",
    "format_prompt",
    "last_boxed",
    "load_jsonl_task",
    "load_preference_jsonl",
    "make_preference_dataset",
    "make_prompt_dataset",
    "make_sft_dataset",
    "preference_length_stats",
    "prompt_length_stats",
    "sft_length_stats",
    "synthetic_preference_pairs",
    "task_special_symbols",
    "tokenize_answer",
    "tokenize_preference_pair",
    "tokenize_prompt",
    "tokenize_sft_example",
    "write_rejection_sft",
]
