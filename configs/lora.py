"""The quickstart with GRPO on LoRA adapters: full cold-start SFT, then GRPO training rank-8 adapters
(W' = W + (α/r)·B·A, Hu et al. arXiv 2106.09685) over the frozen SFT result, which is also the reference.

    python scripts/train.py --config=configs/lora.py --workdir=workdirs/lora [--config.lora.rank=32]

Everything else (task, model, SFT, rewards, rollout budget) is `configs/quickstart.py`'s; the GRPO
learning rate is 10× the quickstart's full fine-tune's, as LoRA needs ("LoRA Without Regret", Thinking
Machines 2025). Any stage of any config built with `grpo_jax.config_utils.add_lora` goes on adapters with
`--config.<stage>.lora=True`. Variants: `:runlocal` (a seconds-long smoke run); `:every_stage` (every
stage kind on adapters after the full cold-start SFT: sft2 → rm → grpo with the reward model → ppo →
dpo, sized like `:runlocal`, what the tests run). `get_sweep` compares full GRPO with rank 1, 8 and 32
adapters (benchmarks/report_lora.py).
"""

import ml_collections

from grpo_jax.config_utils import add_lora, sibling_config
from grpo_jax.models.lora import TARGETS

VARIANTS = ("runlocal", "every_stage")
LORA_LEARNING_RATE_FACTOR = 10.0  # LoRA's learning rate over full fine-tuning's ("LoRA Without Regret")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, *VARIANTS):
        raise ValueError(f"configs/lora.py: unknown variant {arg!r} (known: {', '.join(VARIANTS)})")
    c = sibling_config(__file__, "quickstart.py", "runlocal" if arg else None)
    c.grpo.learning_rate *= LORA_LEARNING_RATE_FACTOR
    if arg != "every_stage":
        return add_lora(c, on=("grpo",), rank=8, alpha=32.0, targets=TARGETS)
    return every_stage(c)


SWEEP_RANKS = (1, 8, 32)


def get_sweep(arg: str | None = None) -> list[dict]:
    """Full GRPO (at the quickstart's own learning rate) vs GRPO on rank 1, 8 and 32 adapters, all after
    the same full cold-start SFT (run once per seed: scripts/sweep.py's shared stages):

        python benchmarks/report_lora.py --seeds=0,1,2   # runs this sweep, writes benchmarks/lora.md
    """
    if arg == "every_stage":
        raise ValueError("configs/lora.py: the sweep has no :every_stage variant (use :runlocal or none)")
    full_lr = sibling_config(__file__, "quickstart.py", arg).grpo.learning_rate
    full = {"_name": "full", "grpo.lora": False, "grpo.learning_rate": full_lr}
    return [full, *({"_name": f"rank{r}", "lora.rank": r} for r in SWEEP_RANKS)]


def every_stage(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """sft (full) → sft2 → rm → grpo (rule rewards + the rm's scores) → ppo → dpo, the last five on
    adapters, two steps each at the `:runlocal` sizes."""
    ppo = sibling_config(__file__, "ppo_baseline.py", "runlocal").ppo
    dpo = sibling_config(__file__, "dpo.py", "runlocal").dpo
    c.stages = ("sft", "sft2", "rm", "grpo", "ppo", "dpo")
    c.sft2 = ml_collections.ConfigDict(c.sft.to_dict())
    c.sft2.update(learning_rate=1e-2, warmup_steps=0, schedule="constant")
    c.rm = ml_collections.ConfigDict(dpo.to_dict())
    del c.rm["beta"], c.rm["label_smoothing"]
    c.rm.update(init_from="sft2", learning_rate=1e-3)
    c.grpo.update(
        init_from="sft2",
        reward_model_from="rm",
        rewards=(("format", 0.2), ("accuracy", 1.0), ("reward_model", 0.5)),
        reference_dtype="",
    )
    c.ppo = ppo
    c.ppo.update(learning_rate=c.grpo.learning_rate, reference_dtype="")
    c.dpo = dpo
    c.dpo.update(learning_rate=1e-3)
    for name in c.stages:
        c[name].update(steps=2, eval_every=2, checkpoint_every=1)
    return add_lora(c, on=("sft2", "rm", "grpo", "ppo", "dpo"), rank=4, alpha=8.0, targets=TARGETS)
