"""Quickstart: R1-style cold-start SFT then GRPO on synthetic arithmetic, from scratch on a laptop CPU.

    python scripts/train.py --config=configs/quickstart.py --workdir=workdirs/quickstart

A tiny Llama-style model (0.6M params) learns 1-2 digit column addition with a written-out chain of
thought (`<think> 8+4+0=12 , 5+6+1=12 </think> <answer> 122 </answer>`) from a cold-start SFT on 120
demonstrations; GRPO with the DeepSeek-R1 rule rewards (format + exact answer) then raises its held-out
greedy accuracy. Nothing is downloaded; the held-out split is never trained on.

Why this recipe (benchmarks/quickstart.md has the five seeds): the SFT runs to its plateau on a small
set, so every seed's cold start is a confident policy (28-46 % held out on seeds 0-4) rather than one caught
half-way up a steep learning curve; GRPO then samples at T = 1.0 (a confident policy's samples stay
sensible, and a group's rewards differ more often than at low temperature) with DAPO's dynamic sampling,
which refills each update to 16 groups whose rewards differ instead of spending it on groups that teach
nothing. The problems are drawn by `task.seed`, so the seed changes the initialisation, data order and
sampling but every seed is judged on the same held-out problems.
`--config=configs/quickstart.py:runlocal` shrinks everything to a seconds-long smoke run (the tests).
"""

import ml_collections

from grpo_jax.algorithms.config import GRPOConfig


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
    # the sampler's own (replica, tensor) mesh over the last devices, config.mesh over the rest;
    # None: co-located (docs/ARCHITECTURE.md, "Asynchronous GRPO")
    c.sampler_mesh = ml_collections.config_dict.placeholder(tuple)
    c.dcn_mesh = (1, 1, 1)  # slices each mesh axis spans (multislice: e.g. (2, 1, 1), data over 2)
    c.template = "plain"
    c.max_prompt_len = 16
    c.max_new_tokens = 40
    c.max_answer_len = 8
    c.logprob_chunk_size = 64
    c.max_nonfinite_in_a_row = 5
    c.progress_bar = True
    c.tensorboard = True
    # JAX persistent compilation cache folder ("" = off): a rerun or resume loads programs, not compiles
    c.compilation_cache_dir = ""
    # rollouts: "static" (grpo_jax.sampling) or "engine" (grpo_jax.rollout: continuous batching over a
    # paged KV cache; the same tokens for the same rng). num_slots 0: one decode slot per row
    c.sampler = "engine"
    # partial rollouts (grpo stages; issue 20): rollout_token_budget > 0 caps each step's decode iterations
    # and carries unfinished samples into the next step (needs algo.is_correction, e.g. "token_tis");
    # max_inflight_groups: groups held at once (0: 4 x prompts_per_step)
    c.engine = ml_collections.ConfigDict(
        dict(num_slots=0, page_size=16, rollout_token_budget=0, max_inflight_groups=0)
    )

    c.task = ml_collections.ConfigDict(
        dict(
            name="arithmetic",
            kwargs=dict(num_digits=(1, 2), operations=("+",)),
            train_size=4000,
            test_size=500,
            seed=0,  # the problems (and held-out split) are fixed; config.seed varies init, order, sampling
            train_file="",
            test_file="",
        )
    )
    c.tokenizer = ml_collections.ConfigDict(dict(path="", vocab_size=48))
    c.model = ml_collections.ConfigDict(
        dict(
            pretrained="",
            vocab_size=0,  # 0: the tokenizer's
            hidden_size=128,
            intermediate_size=384,
            num_layers=3,
            num_heads=4,
            num_kv_heads=2,
            rope_theta=10000.0,
            tie_embeddings=True,
            param_dtype="float32",
            dtype="float32",
            remat="none",
            attention_impl="xla",  # "chunked" (any platform), "splash" (TPU), "cudnn" (GPU): long sequences
            attention_block_size=512,  # queries and keys per block of "chunked" (and "splash")
        )
    )

    c.stages = ("sft", "grpo")
    c.sft = ml_collections.ConfigDict(
        dict(
            steps=400,
            batch_size=32,
            num_examples=120,  # the cold-start set: a few curated demonstrations, learned to a plateau
            max_len=56,
            learning_rate=3e-3,
            warmup_steps=20,
            schedule="cosine",
            weight_decay=0.0,
            max_grad_norm=1.0,
            eval_every=400,
            eval_at_end=True,
            checkpoint_every=100,
        )
    )
    c.grpo = ml_collections.ConfigDict(
        dict(
            steps=225,
            prompts_per_step=16,
            learning_rate=1e-4,
            warmup_steps=0,
            schedule="constant",
            weight_decay=0.0,
            max_grad_norm=1.0,
            grad_accum_steps=1,  # micro-batches per optimizer update (memory, not math)
            shared_prefix=True,  # each prompt's forward once per group in the update (exact; speed)
            top_p=1.0,
            top_k=0,
            reference_dtype="",  # π_ref's storage dtype; "" = the params', "bfloat16" halves it
            rewards=(("format", 0.2), ("accuracy", 1.0)),
            host_rewards=(),
            host_reward_timeout_s=5.0,
            eval_every=50,
            eval_at_start=False,
            eval_at_end=True,
            checkpoint_every=50,
            # rollouts pipelined up to this many updates ahead of the params they train (needs
            # algo.is_correction); 0: on-policy
            off_policy_steps=0,
            algo=ml_collections.ConfigDict(
                GRPOConfig.config_fields(
                    num_generations=8,
                    kl_coef=0.01,
                    clip_eps_low=0.2,
                    clip_eps_high=0.28,
                    loss_agg="token_mean",
                    temperature=1.0,
                    # DAPO's dynamic sampling: every update on 16 groups whose rewards differ
                    dynamic_sampling=True,
                    dynamic_sampling_refill=True,
                )
            ),
        )
    )
    c.eval = ml_collections.ConfigDict(dict(num_problems=500, batch_size=250, k=0, temperature=1.0))
    c.checkpoint = ml_collections.ConfigDict(dict(keep_last=2, keep_best=1, async_save=True))
    c.debug = ml_collections.ConfigDict(dict(poison_step=-1, poison_grad_step=-1))

    if arg == "runlocal":
        c.task.train_size, c.task.test_size = 64, 8
        c.model.update(hidden_size=32, intermediate_size=64, num_layers=1)
        c.sft.update(steps=2, batch_size=8, num_examples=64, eval_every=2, checkpoint_every=1)
        c.grpo.update(steps=2, prompts_per_step=2, eval_every=2, checkpoint_every=1)
        c.grpo.algo.num_generations = 4
        c.max_new_tokens = 12
        c.eval.update(num_problems=8, batch_size=8)
        c.progress_bar = False
    elif arg:
        raise ValueError(f"configs/quickstart.py: unknown variant {arg!r} (known: runlocal)")
    return c
