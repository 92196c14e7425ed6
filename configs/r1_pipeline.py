"""The DeepSeek-R1 recipe (arXiv 2501.12948 §2.3) as six stages on the quickstart's CPU task and model:

    sft                 cold start: SFT on a little curated chain-of-thought data (500 demonstrations)
    grpo                reasoning-oriented RL: format + accuracy + language-consistency rewards
    rejection_sampling  sample 4 completions for each of 768 prompts from the RL policy, keep the correct,
                        well-formed, language-consistent ones, mix in "non-reasoning" SFT rows 3 : 1,
                        write sft.jsonl (and pairs.jsonl: kept vs dropped samples)
    rm                  a reward model (the transformer + a scalar head) from the cold-start SFT params,
                        Bradley–Terry on preference pairs (correct vs corrupted completions)
    sft2                SFT from the BASE model on the rejection-sampling set
    grpo_final          all-scenario RL: 3/4 of the prompts are scored by the rule rewards, 1/4 are routed
                        "open" and scored by the reward model, per example inside the one-program step

    python scripts/train.py --config=configs/r1_pipeline.py --workdir=workdirs/r1

On this synthetic task the "non-reasoning" rows are the task's own curated demonstrations (R1 reuses
DeepSeek-V3's writing/QA data; there is none here), and the "open" prompts are arithmetic prompts whose
reward comes from the learned reward model instead of the verifier, so the routing is exercised end to
end. `:runlocal` runs every stage for a few steps on CPU (the tests run it).
"""

import ml_collections

from grpo_jax.algorithms.config import GRPOConfig
from grpo_jax.config_utils import quickstart_first_recipe, sibling_config

LANGUAGE = ("language_consistency", 0.1, {"no_words_value": 1.0})  # a chain of digits mixes no language


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "runlocal"):
        raise ValueError(f"configs/r1_pipeline.py: unknown variant {arg!r} (known: runlocal)")
    c = quickstart_first_recipe(sibling_config(__file__, "quickstart.py", arg), arg)
    c.stages = ("sft", "grpo", "rejection_sampling", "rm", "sft2", "grpo_final")
    c.sft.num_examples = 500 if arg is None else c.sft.num_examples
    c.grpo.rewards = (("format", 0.2), ("accuracy", 1.0), LANGUAGE)
    if arg is None:
        c.grpo.update(steps=150, eval_every=50, checkpoint_every=50)

    c.rejection_sampling = ml_collections.ConfigDict(
        dict(
            steps=48,  # prompt batches: 3,072 candidates
            prompts_per_step=16,
            num_samples=4,
            temperature=0.7,  # R1's last-stage value; lower gives mostly duplicate correct samples
            top_p=1.0,
            top_k=0,
            rewards=(("format", 1.0), ("accuracy", 1.0), LANGUAGE),
            host_rewards=(),
            host_reward_timeout_s=5.0,
            keep=(("accuracy", 1.0), ("format", 1.0), ("language_consistency", 0.9)),
            drop_truncated=True,
            max_per_prompt=2,
            non_reasoning_data="task",  # "task": the task's curated demonstrations; or a JSONL path
            non_reasoning_examples=1000,
            non_reasoning_ratio=3.0,  # reasoning : non-reasoning (R1: ~600k : ~200k)
            eval_every=0,
            eval_at_end=False,
            checkpoint_every=4,
        )
    )
    c.rm = ml_collections.ConfigDict(
        dict(
            init_from="sft",
            data="",  # synthetic pairs from the task; "stage:rejection_sampling" uses its pairs.jsonl
            num_examples=0,
            heldout_pairs=64,
            steps=150,
            batch_size=32,
            max_len=56,
            learning_rate=1e-4,
            warmup_steps=10,
            schedule="constant",
            weight_decay=0.0,
            max_grad_norm=1.0,
            eval_every=50,
            eval_at_end=True,
            checkpoint_every=50,
        )
    )
    c.sft2 = ml_collections.ConfigDict(c.sft.to_dict())
    c.sft2.update(init_from="base", data="stage:rejection_sampling", num_examples=0)
    if arg is None:
        # About as many epochs over the ~900-row set as the cold start makes over its 500 rows (~15);
        # with the cold start's 225 steps the from-base model reached only 36.6% (benchmarks/r1_pipeline.md).
        c.sft2.update(steps=450, eval_every=225, checkpoint_every=75)
    c.grpo_final = ml_collections.ConfigDict(c.grpo.to_dict())
    # to_dict() turns the algo block's typed placeholders (Optional fields) into plain None, which the
    # command line cannot override: rebuild the block with every GRPOConfig field.
    c.grpo_final.algo = ml_collections.ConfigDict(
        GRPOConfig.config_fields(**GRPOConfig.from_dict(c.grpo.algo).to_dict())
    )
    c.grpo_final.update(
        reward_model_from="rm",
        open_fraction=0.25,
        rewards=(
            ("format", 0.2),
            ("accuracy", 1.0, {"on": "verifiable"}),
            LANGUAGE,
            ("reward_model", 1.0, {"on": "open"}),
        ),
        # Iterative GRPO (DeepSeekMath §4.1.4): keep training the reward model on the policy's samples
        # with 10 % replay of the rm stage's pairs; 0 = off (R1 keeps its reward model fixed).
        rm_retrain_every=0,
        rm_retrain_steps=4,
        rm_batch_size=16,
        rm_replay_fraction=0.1,
        rm_learning_rate=1e-5,
        rm_buffer_size=256,
    )
    if arg == "runlocal":
        # An untrained policy gets nothing right: keep every sample so the later stages have data.
        c.rejection_sampling.update(
            steps=2,
            prompts_per_step=2,
            checkpoint_every=1,
            non_reasoning_examples=8,
            keep=(),
            drop_truncated=False,
        )
        c.rm.update(steps=2, batch_size=8, heldout_pairs=8, eval_every=2, checkpoint_every=1)
        c.grpo_final.update(rm_retrain_every=1, rm_retrain_steps=1, rm_batch_size=4)
    return c
