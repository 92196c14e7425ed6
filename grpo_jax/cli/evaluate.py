"""Evaluate a trained policy or a Hugging Face model on a task's held-out split.

    python scripts/evaluate.py --source=/tmp/quickstart --k=8
    python scripts/evaluate.py --source=/path/to/Qwen2.5-1.5B --config=configs/gsm8k_qwen2_5.py \
        --config.task.train_file=train.jsonl --config.task.test_file=test.jsonl \
        --num_problems=200 --out=eval.json

Prints and (with --out) writes `eval/accuracy` (greedy pass@1), `eval/pass@k` (unbiased estimator) and
`eval/maj@k` (majority vote) from k samples per problem, the same `Evaluator` the trainer runs; each
number is printed with the sampling settings it was measured with. The task, template and lengths come
from the workdir's saved config, or from --config (required for an HF directory, which carries no task;
it may also override a workdir's).

The k samples use the run's rollout settings by default: temperature, top-p and top-k of the
checkpoint's GRPO/PPO stage (or the run's nearest one; `grpo_jax.workdir.run_sampling_settings`),
for an HF directory those of --config's rollout stage; with no rollout stage, config.eval.temperature.
--temperature, --top_p and --top_k override them one by one.
"""

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_SOURCE = flags.DEFINE_string("source", None, "Training workdir or Hugging Face model directory.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config naming the task (required for an HF source)."
)
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "train"], "Which split of the task to evaluate on.")
_NUM_PROBLEMS = flags.DEFINE_integer(
    "num_problems", None, "Problems to evaluate (default config.eval; 0 = all)."
)
_K = flags.DEFINE_integer("k", 8, "Samples per problem for pass@k and maj@k (<= 1: greedy accuracy only).")
_TEMPERATURE = flags.DEFINE_float(
    "temperature", None, "Temperature of the k samples (default: the run's rollout temperature)."
)
_TOP_P = flags.DEFINE_float(
    "top_p", None, "Nucleus mass of the k samples (default: the run's rollout top_p)."
)
_TOP_K = flags.DEFINE_integer(
    "top_k", None, "Top-k of the k samples (default: the run's rollout top_k; 0 = off)."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Problems per sampler call (default config.eval).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "Completion budget (default the config's).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: the latest).")
_BEST = flags.DEFINE_bool("best", False, "Load the workdir's best checkpoint by eval accuracy.")
_SHOW = flags.DEFINE_integer("show", 0, "Print this many greedy completions with their gold answers.")
_OUT = flags.DEFINE_string("out", None, "Write the metrics (and what produced them) to this JSON file.")
flags.mark_flag_as_required("source")

REPORTED = ("eval/accuracy", "eval/pass@k", "eval/maj@k")
SAMPLED = ("eval/pass@k", "eval/maj@k")  # from the k samples; eval/accuracy is greedy


def _fail(message) -> None:
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    sys.exit(1)


def _pick(value, default):
    return default if value is None else value


def evaluate(
    source: str,
    config=None,
    *,
    split: str = "test",
    num_problems: int | None = None,
    k: int = 8,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    seed: int = 0,
    step: int | None = None,
    best: bool = False,
) -> tuple[dict, list[str], list[dict], int | None]:
    """(metrics, greedy completion texts, the evaluated examples, the checkpoint step or None for HF,
    the SamplingSettings of the k samples)."""
    import jax

    from grpo_jax.training import setup
    from grpo_jax.training.evaluator import Evaluator
    from grpo_jax.workdir import (
        SamplingSettings,
        checkpoint_stage,
        is_hf_directory,
        is_workdir,
        load_policy,
        run_sampling_settings,
        select_step,
    )

    if config is None and is_hf_directory(source):
        raise ValueError(
            f"{source} is a Hugging Face directory: give --config=configs/NAME.py to name the task"
        )
    stage = None
    if is_workdir(source):
        step, best = select_step(source, step=step, best=best), False
        stage = checkpoint_stage(source, step)
    model_config, params, tokenizer, saved_config = load_policy(source, step=step, best=best)
    config = config if config is not None else saved_config
    defaults = run_sampling_settings(config, stage) or SamplingSettings(
        temperature=float(config.eval.temperature), source="config.eval (the run has no rollout stage)"
    )
    settings = defaults.override(temperature=temperature, top_p=top_p, top_k=top_k)
    task = setup.build_task(config)
    examples = task.test if split == "test" else task.train
    limit = _pick(num_problems, config.eval.num_problems)
    examples = examples[:limit] if limit else examples
    batch_size = min(_pick(batch_size, config.eval.batch_size), len(examples))
    evaluator = Evaluator(
        model_config,
        tokenizer,
        examples,
        template=config.template,
        max_prompt_len=config.max_prompt_len,
        max_new_tokens=_pick(max_new_tokens, config.max_new_tokens),
        batch_size=batch_size,
        k=k,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        correct_fn=task.correctness,
        generate_fn=setup.sampler_fn(config),
    )
    metrics = evaluator(params, jax.random.key(seed))
    return metrics, evaluator.last_greedy_texts, examples, step, settings


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}")
    try:
        metrics, greedy, examples, step, settings = evaluate(
            _SOURCE.value,
            _CONFIG.value,
            split=_SPLIT.value,
            num_problems=_NUM_PROBLEMS.value,
            k=_K.value,
            temperature=_TEMPERATURE.value,
            top_p=_TOP_P.value,
            top_k=_TOP_K.value,
            batch_size=_BATCH_SIZE.value,
            max_new_tokens=_MAX_NEW_TOKENS.value,
            seed=_SEED.value,
            step=_STEP.value,
            best=_BEST.value,
        )
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
    for text, example in list(zip(greedy, examples, strict=True))[: _SHOW.value]:
        print(f"=== {example['prompt']}\n--- gold: {example['answer']}\n{text}")
    for key in REPORTED:
        if key in metrics:
            label = settings.describe(k=_K.value) if key in SAMPLED else "greedy, T=0"
            print(f"{key} {metrics[key]:.4f}  ({label})")
    print(f"({metrics['eval/num_problems']} problems from the {_SPLIT.value} split of {_SOURCE.value})")
    if _K.value > 1:
        print(f"(sampling settings from {settings.source})")
    if _OUT.value:
        record = dict(
            metrics,
            source=os.path.abspath(_SOURCE.value),
            split=_SPLIT.value,
            step=step,
            seed=_SEED.value,
            sampling=settings.to_dict(),
        )
        with open(_OUT.value, "w") as f:
            json.dump(record, f, indent=2)


def entry_point() -> None:
    """The `grpo-evaluate` console entry point (also `python scripts/evaluate.py`)."""
    app.run(main)


if __name__ == "__main__":
    entry_point()
