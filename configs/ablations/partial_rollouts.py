"""Ablation: partial rollouts (Kimi k1.5 arXiv 2501.12599 §2.6.2; docs/ARCHITECTURE.md "Partial rollouts")
on the quickstart itself (configs/quickstart.py: its model, SFT and 225 GRPO steps).

    python scripts/sweep.py --config=configs/ablations/partial_rollouts.py \\
        --workdir=workdirs/partial_rollouts --seeds=0,1,2

off: the quickstart as it is (the engine, whole rollouts, DAPO dynamic sampling with refill); whole: the
engine with whole rollouts and dynamic sampling without refill (what partial rollouts can be combined
with); on: the same
with a budget of L/4 = 10 decode iterations per step, unfinished samples carried to the next step and
decoupled PPO's truncated importance weight (`is_correction="token_tis"`, C = 2). The quickstart's
completions (about 25 of L = 40 tokens) are not long-tailed, so at L/4 a step must decode 4 x as many
samples at once to hand out its 16 groups: "on" runs 4 x B·G = 512 slots and holds 8 x B = 128 groups.
`:runlocal` shrinks every point to a seconds-long smoke run.
"""

from grpo_jax.config_utils import sibling_config

WHOLE = {
    "sampler": "engine",
    "grpo.algo.dynamic_sampling_refill": False,
}


def get_config(arg=None):
    return sibling_config(__file__, "../quickstart.py", arg)


def get_sweep(arg=None):
    runlocal = arg == "runlocal"
    budget, batch, group = (3, 2, 4) if runlocal else (10, 16, 8)  # L/4 of max_new_tokens (12, 40)
    return [
        {"_name": "off", "sampler": "engine", "grpo.algo.dynamic_sampling_refill": True},  # the quickstart
        {"_name": "whole", **WHOLE},
        {
            "_name": "on",
            **WHOLE,
            "engine.rollout_token_budget": budget,
            "engine.num_slots": 4 * batch * group,
            "engine.max_inflight_groups": 8 * batch,
            "grpo.algo.is_correction": "token_tis",
        },
    ]
