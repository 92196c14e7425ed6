"""Ablation: asynchronous GRPO's staleness (docs/ARCHITECTURE.md "Asynchronous GRPO") on the quickstart
itself (configs/quickstart.py: its model, SFT and 225 GRPO steps): rollouts pipelined k = 0, 1, 2 updates
ahead of the params they train, co-located (this CPU has no second device to put the sampler on; the
learning is the same on a sampler mesh, which only changes where the rollout decodes).

    python scripts/sweep.py --config=configs/ablations/off_policy.py \\
        --workdir=workdirs/off_policy --seeds=0,1,2

Every point runs the same algorithm: dynamic sampling without refill (its refill rounds are not
pipelined) and decoupled PPO's truncated importance weight (`is_correction="token_tis"`, C = 2), so the
points differ only in k. `:runlocal` shrinks every point to a seconds-long smoke run.
"""

from grpo_jax.config_utils import sibling_config

SAME = {
    "grpo.algo.dynamic_sampling_refill": False,
    "grpo.algo.is_correction": "token_tis",
}


def get_config(arg=None):
    return sibling_config(__file__, "../quickstart.py", arg)


def get_sweep(arg=None):
    del arg
    return [{"_name": f"k{k}", **SAME, "grpo.off_policy_steps": k} for k in (0, 1, 2)]
