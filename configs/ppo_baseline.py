"""PPO with a critic on the quickstart task: the baseline GRPO is contrasted with (DeepSeekMath §4.1).

    python scripts/train.py --config=configs/ppo_baseline.py --workdir=workdirs/ppo

Same task, model, cold-start SFT, rewards, rollout budget (16 prompts x 8 samples per step) and policy
optimizer as `quickstart.py`'s GRPO stage; the `ppo` stage adds a value model as large as the policy
(initialised from it, with a scalar head), token rewards −β·KL_t plus the outcome reward at the last
token, GAE(γ=1, λ=0.95) and a clipped value loss. `:runlocal` shrinks it to a seconds-long CPU run.
"""

import ml_collections

from grpo_jax.algorithms.ppo_config import PPOConfig
from grpo_jax.config_utils import quickstart_first_recipe, sibling_config


def ppo_section(grpo_section: ml_collections.ConfigDict, **algo) -> ml_collections.ConfigDict:
    """A `ppo` stage section with the GRPO section's data, rewards and optimizer, and a PPOConfig."""
    section = ml_collections.ConfigDict(grpo_section.to_dict())
    del section["algo"]
    grpo_algo = grpo_section.algo
    section.algo = ml_collections.ConfigDict(
        PPOConfig.config_fields(
            **{
                "num_generations": grpo_algo.num_generations,
                "kl_coef": grpo_algo.kl_coef,
                "temperature": grpo_algo.temperature,
                "value_learning_rate": 5e-4,
                **algo,
            }
        )
    )
    return section


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "runlocal"):
        raise ValueError(f"configs/ppo_baseline.py: unknown variant {arg!r} (known: runlocal)")
    c = quickstart_first_recipe(sibling_config(__file__, "quickstart.py", arg), arg)
    c.stages = ("sft", "ppo")
    c.ppo = ppo_section(c.grpo)
    del c["grpo"]
    return c
