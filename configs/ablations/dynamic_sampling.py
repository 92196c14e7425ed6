"""Ablation: DAPO dynamic sampling (arXiv 2503.14476 §3.2) on the quickstart task.

    python scripts/sweep.py --config=configs/ablations/dynamic_sampling.py \
        --workdir=workdirs/dynamic_sampling --seeds=0,1,2

off; mask: groups whose rewards are all equal (all right or all wrong: zero advantage) get weight 0, so
the token-mean loss is averaged over the groups that carry signal (`zero_variance_frac` in metrics.jsonl
says how many were dropped); refill: sample 1.5 × 16 = 24 prompts per round and up to 2 extra rounds
until 16 groups with signal are in hand (`refill/*` in metrics.jsonl), so every step trains on a full
batch of informative groups, at the cost of more sampling. `:runlocal` shrinks every point to a
seconds-long smoke run.
"""

from grpo_jax.config_utils import ablation_config


def get_config(arg=None):
    return ablation_config(__file__, arg)


def get_sweep(arg=None):
    del arg
    return [
        {"_name": "off", "grpo.algo.dynamic_sampling": False},
        {"_name": "mask", "grpo.algo.dynamic_sampling": True},
        {
            "_name": "refill",
            "grpo.algo.dynamic_sampling_refill": True,
            "grpo.algo.refill_oversample": 1.5,
            "grpo.algo.refill_max_rounds": 2,
        },
    ]
