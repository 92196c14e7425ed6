"""Export a trained policy to a Hugging Face directory, or check that an HF directory loads and runs.

    python scripts/convert_hf.py --workdir=/tmp/quickstart --out=/tmp/quickstart_hf [--best] [--check]
    python scripts/convert_hf.py --hf=/tmp/quickstart_hf --check

Export writes `config.json` (with the tokenizer's bos/eos/pad ids) and `*.safetensors` in the
LlamaForCausalLM / Qwen2ForCausalLM layout (`grpo_jax.models.save_pretrained`), plus the tokenizer:
`tokenizer.model` for a SentencePiece tokenizer trained by the run, or the HF tokenizer files the run was
started from. `transformers` and `load_pretrained` read the result. With --check after an export, the
directory is loaded back and its logits compared with the workdir policy's.
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
        if not _OUT.value:
            raise ValueError("--workdir=DIR needs --out=HF_DIR")
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
