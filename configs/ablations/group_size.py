"""Ablation: the group size G at an equal number of samples per step (prompts_per_step × G constant).

    python scripts/sweep.py --config=configs/ablations/group_size.py --workdir=workdirs/group_size \
        --seeds=0,1,2

The quickstart samples 16 prompts × G = 8 = 128 completions per step; here G ∈ {2, 4, 8, 16} with 64, 32,
16, 8 prompts: a larger group gives a better baseline for fewer distinct prompts. `:runlocal` keeps
8 samples per step (G ∈ {2, 4, 8} with 4, 2, 1 prompts).
"""

from grpo_jax.config_utils import ablation_config


def get_config(arg=None):
    return ablation_config(__file__, arg)


def get_sweep(arg=None):
    samples, groups = (8, (2, 4, 8)) if arg == "runlocal" else (128, (2, 4, 8, 16))
    return [
        {"_name": f"G={g}", "grpo.algo.num_generations": g, "grpo.prompts_per_step": samples // g}
        for g in groups
    ]
