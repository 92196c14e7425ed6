"""Quickstart with process supervision: the same SFT then GRPO on synthetic arithmetic, but GRPO's
advantages come from a rule-based verifier's reward for every column step of the chain of thought
(DeepSeekMath arXiv 2402.03300 §4.1.3) instead of one outcome reward per completion.

    python scripts/train.py --config=configs/quickstart_process.py --workdir=workdirs/quickstart_process

`grpo.step_verifier` names a verifier in `grpo_jax.rewards.process.STEP_VERIFIERS` and `grpo.max_steps` is
the number of step slots per completion (`process_step_rewards(max_steps=...)`); the outcome rewards
(format, accuracy) are still computed and logged. `:runlocal` shrinks it like the quickstart's.
"""

import ml_collections

from grpo_jax.config_utils import quickstart_first_recipe, sibling_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "", "runlocal"):
        raise ValueError(f"configs/quickstart_process.py: unknown variant {arg!r} (known: runlocal)")
    c = quickstart_first_recipe(sibling_config(__file__, "quickstart.py", arg or None), arg or None)
    c.grpo.algo.advantage_estimator = "process"
    c.grpo.step_verifier = "arithmetic"
    # Step slots per completion: 1-2 digit addition needs <= 2 column steps + the answer; the rest leaves
    # room for extra steps a sampled chain may write (more are folded into the last slot before the answer).
    c.grpo.max_steps = 8
    return c
