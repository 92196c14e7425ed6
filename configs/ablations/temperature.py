"""Ablation: the rollout sampling temperature on the quickstart task.

    python scripts/sweep.py --config=configs/ablations/temperature.py --workdir=workdirs/temperature \
        --seeds=0,1,2

T ∈ {0.35 (the quickstart: close to the greedy policy it is judged on), 0.7 (R1's last stage), 1.0 (R1)};
evaluation stays greedy. `:runlocal` shrinks every point to a seconds-long smoke run.
"""

from grpo_jax.config_utils import ablation_config

TEMPERATURES = (0.35, 0.7, 1.0)


def get_config(arg=None):
    return ablation_config(__file__, arg)


def get_sweep(arg=None):
    del arg
    return [{"grpo.algo.temperature": t} for t in TEMPERATURES]
