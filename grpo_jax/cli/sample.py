"""Sample completions from a trained policy or a Hugging Face model and print them.

    python scripts/sample.py --source=/tmp/quickstart --prompt="What is 12 + 34?" --num_samples=4
    python scripts/sample.py --source=/path/to/Qwen2.5-0.5B --template=r1_zero --prompts_file=prompts.jsonl

--source is a training workdir (latest checkpoint; --step or --best to pick another) or an HF directory.
Prompts come from --prompt (repeatable) and/or --prompts_file (JSONL, one object with a "prompt" field
per line). Each prompt is wrapped in --template (default: the run's template, "plain" for an HF model)
and sampled --num_samples times in one batched call of the jitted sampler (the run's `config.sampler`;
the rollout engine for an HF directory).

For a training workdir, temperature, top-p and top-k default to the run's rollout settings (those of the
checkpoint's GRPO/PPO stage, or of the run's nearest one: `grpo_jax.workdir.run_sampling_settings`);
for an HF directory to T=1, top_p=1, top_k=0. --temperature, --top_p and --top_k override them one by
one. The settings used are printed before the samples and written into every --out line.
"""

import json
import os
import sys

from absl import app, flags

_SOURCE = flags.DEFINE_string("source", None, "Training workdir or Hugging Face model directory.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file", None, "JSONL file; each line an object with a 'prompt' field."
)
_TEMPLATE = flags.DEFINE_string(
    "template", None, "Prompt template (plain, r1_zero, raw, chat); default: the run's."
)
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 4, "Completions per prompt.")
_TEMPERATURE = flags.DEFINE_float(
    "temperature", None, "Sampling temperature; 0 is greedy (default: the run's rollout temperature, else 1)."
)
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling mass, 1 = off (default: the run's, else 1).")
_TOP_K = flags.DEFINE_integer("top_k", None, "Top-k sampling, 0 = off (default: the run's, else 0).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "Completion budget in tokens.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: the latest).")
_BEST = flags.DEFINE_bool("best", False, "Load the workdir's best checkpoint by eval accuracy.")
_OUT = flags.DEFINE_string("out", None, "Also write one JSON line per prompt {prompt, completions} here.")
flags.mark_flag_as_required("source")


def _fail(message) -> None:
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    sys.exit(1)


def read_prompts_file(path: str) -> list[str]:
    """The "prompt" field of every non-blank line; a malformed line raises ValueError naming path:line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path}:{number}: expected an object with a string 'prompt' field")
            prompts.append(record["prompt"])
    return prompts


def sample(
    source: str,
    prompts: list[str],
    *,
    template: str | None,
    num_samples: int,
    max_new_tokens: int,
    seed: int,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    step: int | None = None,
    best: bool = False,
):
    """(for each prompt, `num_samples` dicts {text, num_tokens, truncated}; the SamplingSettings used).
    temperature/top_p/top_k: None takes the run's rollout setting (workdir) or the default."""
    import jax
    import numpy as np

    from grpo_jax import rollout as rollout_engine
    from grpo_jax.data.pipeline import tokenize_prompt
    from grpo_jax.data.templates import format_prompt
    from grpo_jax.training import setup
    from grpo_jax.workdir import (
        SamplingSettings,
        checkpoint_stage,
        is_workdir,
        load_policy,
        run_sampling_settings,
        select_step,
    )

    stage = None
    if is_workdir(source):
        step, best = select_step(source, step=step, best=best), False
        stage = checkpoint_stage(source, step)
    model_config, params, tokenizer, config = load_policy(source, step=step, best=best)
    defaults = (run_sampling_settings(config, stage) if config is not None else None) or SamplingSettings()
    settings = defaults.override(temperature=temperature, top_p=top_p, top_k=top_k)
    template = template or (config.template if config is not None else "plain")
    add_bos = tokenizer.bos_id is not None
    prompt_len = max(
        len(tokenizer.encode(format_prompt(template, p, tokenizer), add_bos=add_bos)) for p in prompts
    )
    rows = [tokenize_prompt({"prompt": p}, tokenizer, template, prompt_len) for p in prompts]
    # The run's sampler (config.sampler), the rollout engine for an HF directory: the same tokens either way.
    generate = setup.sampler_fn(config) if config is not None else rollout_engine.generate
    rollout = generate(
        model_config,
        params,
        np.stack([r[0] for r in rows]),
        np.stack([r[1] for r in rows]),
        jax.random.key(seed),
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
    )
    tokens, lengths, truncated = jax.device_get((rollout.tokens, rollout.lengths, rollout.truncated))
    results = []
    for i in range(len(prompts)):
        group = []
        for row in range(i * num_samples, (i + 1) * num_samples):
            length = int(lengths[row])
            shown = (
                tokens[row, :length] if truncated[row] else tokens[row, : max(length - 1, 0)]
            )  # drop the stop token
            group.append(
                {
                    "text": tokenizer.decode(shown.tolist()),
                    "num_tokens": length,
                    "truncated": bool(truncated[row]),
                }
            )
        results.append(group)
    return results, settings


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}")
    try:
        prompts = list(_PROMPT.value) + (
            read_prompts_file(_PROMPTS_FILE.value) if _PROMPTS_FILE.value else []
        )
        if not prompts:
            raise ValueError("no prompt: give --prompt=... (repeatable) or --prompts_file=x.jsonl")
        if _NUM_SAMPLES.value < 1 or _MAX_NEW_TOKENS.value < 1:
            raise ValueError("--num_samples and --max_new_tokens must be >= 1")
        results, settings = sample(
            _SOURCE.value,
            prompts,
            template=_TEMPLATE.value,
            num_samples=_NUM_SAMPLES.value,
            temperature=_TEMPERATURE.value,
            top_p=_TOP_P.value,
            top_k=_TOP_K.value,
            max_new_tokens=_MAX_NEW_TOKENS.value,
            seed=_SEED.value,
            step=_STEP.value,
            best=_BEST.value,
        )
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
    print(f"sampling: {settings.describe()} (from {settings.source})")
    for prompt, group in zip(prompts, results, strict=True):
        print(f"=== prompt: {prompt}")
        for j, completion in enumerate(group, start=1):
            end = "truncated" if completion["truncated"] else "stopped"
            print(f"--- sample {j} ({completion['num_tokens']} tokens, {end})")
            print(completion["text"])
    if _OUT.value:
        with open(_OUT.value, "w", encoding="utf-8") as f:
            for prompt, group in zip(prompts, results, strict=True):
                record = {"prompt": prompt, "completions": group, "sampling": settings.to_dict()}
                f.write(json.dumps(record) + "\n")


def entry_point() -> None:
    """The `grpo-sample` console entry point (also `python scripts/sample.py`)."""
    app.run(main)


if __name__ == "__main__":
    entry_point()
