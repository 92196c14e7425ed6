"""Ablation: GRPO's policy-loss variants on the quickstart task (cold-start SFT, then GRPO).

    python scripts/sweep.py --config=configs/ablations/loss_variants.py --workdir=workdirs/loss_variants \
        --seeds=0,1,2

Points (each a `config.grpo.algo` switch, docs/ALGORITHMS.md): GRPO (DeepSeekMath eq. 3: per-sequence token
mean, std-scaled group advantages), Dr. GRPO (arXiv 2503.20783: mean-only advantages, token sums over a
constant), DAPO's token-level mean (arXiv 2503.14476 eq. 8), GSPO's sequence-level ratio (arXiv
2507.18071, ε 3e-4/4e-4) and CISPO (arXiv 2506.13585: clipped, stop-gradient IS weight times log π).
Everything else is the quickstart's (β = 0.01, clip-higher 0.2/0.28, T = 0.35). `:runlocal` shrinks every
point to a seconds-long smoke run.
"""

from grpo_jax.config_utils import ablation_config


def get_config(arg=None):
    return ablation_config(__file__, arg)


def get_sweep(arg=None):
    del arg
    a = "grpo.algo."
    return [
        {"_name": "grpo", a + "loss_agg": "seq_mean_token_mean", a + "advantage_estimator": "grpo"},
        {"_name": "dr_grpo", a + "loss_agg": "seq_mean_token_sum_norm", a + "advantage_estimator": "dr_grpo"},
        {"_name": "dapo_token_mean", a + "loss_agg": "token_mean", a + "advantage_estimator": "grpo"},
        {
            "_name": "gspo",
            a + "loss_agg": "seq_mean_token_mean",
            a + "ratio_level": "sequence",
            a + "clip_eps_low": 3e-4,
            a + "clip_eps_high": 4e-4,
        },
        {"_name": "cispo", a + "loss_type": "cispo", a + "loss_agg": "token_mean"},
    ]
