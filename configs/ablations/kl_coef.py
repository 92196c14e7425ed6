"""Ablation: the KL coefficient β to the frozen reference on the quickstart task.

    python scripts/sweep.py --config=configs/ablations/kl_coef.py --workdir=workdirs/kl_coef --seeds=0,1,2

β ∈ {0 (Dr. GRPO, DAPO), 0.001 (DeepSeek-R1), 0.01 (the quickstart), 0.04 (DeepSeekMath)}, k3 estimator
in the loss. `:runlocal` shrinks every point to a seconds-long smoke run.
"""

from grpo_jax.config_utils import ablation_config

BETAS = (0.0, 0.001, 0.01, 0.04)


def get_config(arg=None):
    return ablation_config(__file__, arg)


def get_sweep(arg=None):
    del arg
    return [{"grpo.algo.kl_coef": beta} for beta in BETAS]
