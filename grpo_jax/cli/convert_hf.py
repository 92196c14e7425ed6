"""Export a trained policy to a Hugging Face directory, or check that an HF directory loads and runs.

    python scripts/convert_hf.py --workdir=/tmp/quickstart --out=/tmp/quickstart_hf [--best] [--check]
    python scripts/convert_hf.py --workdir=/tmp/lora --adapter_out=/tmp/lora_adapter [--out=...]
    python scripts/convert_hf.py --hf=/tmp/quickstart_hf --check

Export writes `config.json` (with the tokenizer's bos/eos/pad ids) and `*.safetensors` in the
LlamaForCausalLM / Qwen2ForCausalLM layout (`grpo_jax.models.save_pretrained`), plus the tokenizer:
`tokenizer.model` for a SentencePiece tokenizer trained by the run, or the HF tokenizer files the run was
started from. `transformers` and `load_pretrained` read the result. With --check after an export, the
directory is loaded back and its logits compared with the workdir policy's.
A LoRA stage's checkpoint exports as the merged policy with --out, and with --adapter_out as a PEFT
adapter directory (`adapter_config.json` + `adapter_model.safetensors`, `grpo_jax.models.lora`), which
`peft.PeftModel.from_pretrained` loads onto the base it was trained on: the pretrained model when the
stage started from it (its path is written as `base_model_name_or_path`), else an earlier stage's result
(named in the file; export that stage's checkpoint with --out for an HF copy of it).
--hf=DIR --check loads DIR, runs one forward pass on a short text and prints the shapes.
"""

import glob
import json
import os
import shutil
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to export.")
_OUT = flags.DEFINE_string("out", None, "Output Hugging Face directory (must not hold safetensors already).")
_ADAPTER_OUT = flags.DEFINE_string(
    "adapter_out", None, "Write a LoRA checkpoint's adapters to this PEFT adapter directory."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BEST = flags.DEFINE_bool("best", False, "Export the best checkpoint by eval accuracy.")
_HF = flags.DEFINE_string("hf", None, "Hugging Face directory to check.")
_CHECK = flags.DEFINE_bool("check", False, "Load the (exported) HF directory and run one forward pass.")
_TEXT = flags.DEFINE_string("text", "Question: 12+34\nAnswer:", "Text of the --check forward pass.")

# Files of a Hugging Face tokenizer directory that travel with an exported model.
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)


def _fail(message) -> None:
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    sys.exit(1)


def save_tokenizer(tokenizer, out: str) -> list[str]:
    """Write `tokenizer` next to an exported model; returns the file names written."""
    from grpo_jax.tokenizers import HFTokenizer, SentencePieceTokenizer

    if isinstance(tokenizer, SentencePieceTokenizer):
        tokenizer.save(os.path.join(out, "tokenizer.model"))
        return ["tokenizer.model"]
    if isinstance(tokenizer, HFTokenizer):
        copied = [name for name in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer.path, name))]
        for name in copied:
            shutil.copyfile(os.path.join(tokenizer.path, name), os.path.join(out, name))
        return copied
    raise ValueError(f"cannot save a tokenizer of type {type(tokenizer).__name__}")


def export(workdir: str, out: str, *, step: int | None = None, best: bool = False):
    """Export the workdir's policy to `out`; returns (model_config, params, tokenizer, step)."""
    from grpo_jax.models import save_pretrained
    from grpo_jax.workdir import is_workdir, load_policy, select_step

    if glob.glob(os.path.join(out, "*.safetensors")):
        raise ValueError(f"{out} already holds *.safetensors; choose an empty --out")
    if is_workdir(workdir):
        step, best = select_step(workdir, step=step, best=best), False
    model_config, params, tokenizer, _ = load_policy(workdir, step=step, best=best)
    save_pretrained(model_config, params, out)
    config_path = os.path.join(out, "config.json")
    with open(config_path) as f:
        hf_config = json.load(f)
    hf_config.update(
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id
    )
    with open(config_path, "w") as f:
        json.dump(hf_config, f, indent=2)
    written = save_tokenizer(tokenizer, out)
    print(
        f"exported step {step} of {workdir} to {out} ({model_config.num_params():,} parameters; "
        f"tokenizer files: {', '.join(written)})"
    )
    return model_config, params, tokenizer, step


def export_adapter(workdir: str, out: str, *, step: int | None = None, best: bool = False) -> int:
    """Write the LoRA adapters of a workdir checkpoint as a PEFT adapter directory; returns the step."""
    import jax

    from grpo_jax.checkpointing import Checkpointer, checkpoint_directory
    from grpo_jax.models import lora as lora_lib
    from grpo_jax.training import setup
    from grpo_jax.workdir import _workdir_tokenizer, read_config, select_step

    if os.path.exists(os.path.join(out, lora_lib.PEFT_WEIGHTS_FILE)):
        raise ValueError(f"{out} already holds {lora_lib.PEFT_WEIGHTS_FILE}; choose an empty --adapter_out")
    step = select_step(workdir, step=step, best=best)
    config = read_config(workdir)
    tokenizer = _workdir_tokenizer(config, workdir)
    model_config = setup.build_model_config(config, tokenizer)
    with Checkpointer(checkpoint_directory(workdir), read_only=True) as checkpointer:
        extra = checkpointer.read_extra(step)
        info = extra.get("lora")
        if info is None:
            raise ValueError(
                f"{workdir}: checkpoint {step} (stage {extra['stage']!r}) trains every weight and has no "
                "adapters; export it with --out"
            )
        lora = lora_lib.LoRAConfig.from_dict(info["config"])
        template = jax.eval_shape(lambda: lora_lib.init_adapters(model_config, lora, jax.random.key(0)))
        adapters, _ = checkpointer.restore_params(
            template, step=step, fingerprint=setup.fingerprint(model_config, tokenizer)
        )
    source = info.get("base_from")
    pretrained = config.model.pretrained if source is None else ""
    lora_lib.save_peft_adapter(
        lora,
        adapters,
        out,
        base_model=pretrained,
        model_config=model_config,
        base_from=f"stages/{source}/result" if source else (pretrained or "the run's initial model"),
        base_fingerprint=info["base_fingerprint"],
    )
    base = pretrained or (f"{workdir}/stages/{source}/result" if source else "the run's seeded initial model")
    print(f"exported the rank-{lora.rank} LoRA adapters of step {step} of {workdir} to {out}; base: {base}")
    return step


def check(hf_dir: str, text: str):
    """Load `hf_dir`, run one forward pass on `text`; returns (tokens [1, T], logits [1, T, V])."""
    import numpy as np

    from grpo_jax import models
    from grpo_jax.tokenizers import load_tokenizer

    model_config, params = models.load_pretrained(hf_dir)
    tokenizer = load_tokenizer(hf_dir)
    ids = tokenizer.encode(text, add_bos=tokenizer.bos_id is not None)
    tokens = np.asarray([ids], np.int32)
    logits = np.asarray(models.forward(model_config, params, tokens))
    if not np.all(np.isfinite(logits)):
        raise ValueError(f"{hf_dir}: the forward pass gave non-finite logits")
    print(
        f"{hf_dir}: {model_config.architecture}, {model_config.num_layers} layers, "
        f"hidden {model_config.hidden_size}, "
        f"{model_config.num_params():,} parameters ({model_config.param_dtype}); tokenizer vocab "
        f"{tokenizer.vocab_size}, eos {tokenizer.eos_id}"
    )
    print(
        f"forward: tokens {tuple(tokens.shape)} -> logits {tuple(logits.shape)} {logits.dtype}; "
        f"next token {tokenizer.id_to_piece(int(np.argmax(logits[0, -1])))!r}"
    )
    return tokens, logits


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}")
    try:
        if bool(_WORKDIR.value) == bool(_HF.value):
            raise ValueError("give either --workdir=DIR --out=HF_DIR (export) or --hf=HF_DIR --check")
        if _HF.value:
            if not _CHECK.value:
                raise ValueError("--hf=HF_DIR needs --check (there is nothing else to do with it)")
            check(_HF.value, _TEXT.value)
            return
        if not _OUT.value and not _ADAPTER_OUT.value:
            raise ValueError("--workdir=DIR needs --out=HF_DIR and/or --adapter_out=PEFT_DIR")
        if _ADAPTER_OUT.value:
            export_adapter(_WORKDIR.value, _ADAPTER_OUT.value, step=_STEP.value, best=_BEST.value)
        if not _OUT.value:
            return
        model_config, params, tokenizer, _ = export(
            _WORKDIR.value, _OUT.value, step=_STEP.value, best=_BEST.value
        )
        if _CHECK.value:
            import numpy as np

            from grpo_jax import models

            tokens, logits = check(_OUT.value, _TEXT.value)
            expected = np.asarray(models.forward(model_config, params, tokens))
            difference = float(np.max(np.abs(logits - expected)))
            print(f"max |logits(exported) - logits(workdir)| = {difference:.3g}")
            if difference > 1e-4 * max(1.0, float(np.max(np.abs(expected)))):
                raise ValueError(f"exported logits differ from the workdir policy's by {difference:.3g}")
    except (ValueError, FileNotFoundError) as error:
        _fail(error)


def entry_point() -> None:
    """The `grpo-convert-hf` console entry point (also `python scripts/convert_hf.py`)."""
    app.run(main)


if __name__ == "__main__":
    entry_point()
