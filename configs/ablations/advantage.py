"""Ablation: the advantage estimator (the baseline that replaces PPO's value model) on the quickstart task.

    python scripts/sweep.py --config=configs/ablations/advantage.py --workdir=workdirs/advantage --seeds=0,1,2

grpo (group mean and std, DeepSeekMath §4.1.2), rloo (leave-one-out group mean), reinforce_pp (batch-
normalised REINFORCE++), dr_grpo (group mean, no std; arXiv 2503.20783). The loss is the quickstart's
(token mean, β = 0.01). `:runlocal` shrinks every point to a seconds-long smoke run.
"""

from grpo_jax.config_utils import ablation_config

ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "dr_grpo")


def get_config(arg=None):
    return ablation_config(__file__, arg)


def get_sweep(arg=None):
    del arg
    return [{"grpo.algo.advantage_estimator": name} for name in ESTIMATORS]
