"""GRPO vs PPO vs process-supervised GRPO from the SAME cold-start SFT checkpoint, on the quickstart task.

    python scripts/train.py --config=configs/compare_rl.py --workdir=workdirs/compare_rl

Stages: `sft` (the quickstart's), then three RL stages that each start from the SFT result
(`init_from="sft"`), with the same prompts per step, samples per prompt, rewards, temperature and
policy learning rate:
  grpo          outcome supervision, group-relative advantages, no value model (DeepSeekMath eq. 3)
  ppo           PPO with a critic as large as the policy, GAE (DeepSeekMath eq. 1-2)
  grpo_process  process supervision: per-step rewards from the arithmetic step verifier (§4.1.3)
Each RL stage runs 150 steps (half the quickstart's GRPO stage: on this task most of the gain comes
early), so three arms and three seeds fit in about an hour on a 2-core CPU.
`benchmarks/report_stages.py` runs it for several seeds and writes `benchmarks/grpo_vs_ppo.md`.
"""

import ml_collections

from grpo_jax.config_utils import quickstart_first_recipe, sibling_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "runlocal"):
        raise ValueError(f"configs/compare_rl.py: unknown variant {arg!r} (known: runlocal)")
    c = quickstart_first_recipe(sibling_config(__file__, "quickstart.py", arg), arg)
    c.ppo = sibling_config(__file__, "ppo_baseline.py", arg).ppo
    c.grpo_process = sibling_config(__file__, "quickstart_process.py", arg).grpo
    c.stages = ("sft", "grpo", "ppo", "grpo_process")
    for name in ("ppo", "grpo_process"):
        c[name].init_from = "sft"
    if arg is None:
        for name in ("grpo", "ppo", "grpo_process"):
            c[name].steps = 150
    return c
