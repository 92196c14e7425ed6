"""DPO on the quickstart task: cold-start SFT, then Direct Preference Optimization (arXiv 2305.18290) on
offline preference pairs, a correct and well-formed completion preferred over a corrupted one (wrong
answer, wrong step, broken tags; `grpo_jax.data.preferences.synthetic_preference_pairs`).

    python scripts/train.py --config=configs/dpo.py --workdir=workdirs/dpo

`--config.dpo.data=PATH.jsonl` trains on a file of {"prompt", "chosen", "rejected"} lines instead.
`:runlocal` shrinks it to a seconds-long CPU run.
"""

import ml_collections

from grpo_jax.config_utils import quickstart_first_recipe, sibling_config


def dpo_section(**overrides) -> ml_collections.ConfigDict:
    section = dict(
        steps=150,
        batch_size=32,
        max_len=56,
        data="",  # "": synthetic pairs from the task; "stage:NAME": an earlier stage's pairs.jsonl; a path
        num_examples=0,  # 0: every pair
        heldout_pairs=64,
        beta=0.1,
        label_smoothing=0.0,
        init_from="previous",
        reference_dtype="",  # π_ref's storage dtype; "" = the params', "bfloat16" halves it
        learning_rate=1e-4,
        warmup_steps=10,
        schedule="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        eval_every=50,
        eval_at_end=True,
        checkpoint_every=50,
    )
    section.update(overrides)
    return ml_collections.ConfigDict(section)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "runlocal"):
        raise ValueError(f"configs/dpo.py: unknown variant {arg!r} (known: runlocal)")
    c = quickstart_first_recipe(sibling_config(__file__, "quickstart.py", arg), arg)
    c.stages = ("sft", "dpo")
    del c["grpo"]
    c.dpo = dpo_section()
    if arg == "runlocal":
        c.dpo.update(steps=2, batch_size=8, heldout_pairs=8, eval_every=2, checkpoint_every=1)
    return c
