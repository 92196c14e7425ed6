"""R1-Zero on Countdown: GRPO straight from a base model, rule rewards only, no SFT (DeepSeek-R1 §2.2).

    python scripts/train.py --config=configs/r1_zero_countdown.py --workdir=/tmp/r1_zero_countdown \
        --config.model.pretrained=/path/to/Qwen2.5-3B

The policy sees the R1-Zero template and is rewarded for the tag format (in-graph) and for a valid
Countdown equation (host, TinyZero's score: 1 correct, 0.1 well-formed but wrong, 0 no answer).
RL settings are the R1 paper's (Nature version, Methods; docs/ALGORITHMS.md): lr 3e-6, β = 0.001, G = 16,
a rollout of 512 questions x 16 outputs split into 16 minibatches of 32 x 16 (one inner epoch),
temperature 1, reference reset every 400 steps. Shrink `grpo.prompts_per_step` together with
`grpo.algo.num_minibatches` for smaller machines.

A tokenizer trained by the run has <think>, </think>, <answer>, </answer> as single tokens; a pretrained
model's tokenizer that splits them (Qwen2.5's) serves as well: the in-graph format reward matches them as
token sequences.
Without `model.pretrained` a model is trained from scratch with its own SentencePiece tokenizer (a
smoke test, not R1-Zero). `:runlocal` shrinks everything to a seconds-long CPU run (used by the tests).
"""

import ml_collections

from grpo_jax.algorithms.config import GRPOConfig


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = (1, -1, 1)  # (data, fsdp, tensor): params and optimizer state sharded over every device
    # the sampler's own (replica, tensor) mesh over the last devices, config.mesh over the rest;
    # None: co-located (docs/ARCHITECTURE.md, "Asynchronous GRPO")
    c.sampler_mesh = ml_collections.config_dict.placeholder(tuple)
    c.dcn_mesh = (1, 1, 1)  # slices each mesh axis spans (multislice: e.g. (2, 1, 1), data over 2)
    c.template = "r1_zero"
    c.max_prompt_len = 256
    c.max_new_tokens = 1024
    c.max_answer_len = 32
    c.logprob_chunk_size = 256
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
            name="countdown",
            kwargs=dict(num_numbers=(3, 4), max_number=100, max_target=100),
            train_size=100_000,
            test_size=1024,
            train_file="",
            test_file="",
        )
    )
    c.tokenizer = ml_collections.ConfigDict(dict(path="", vocab_size=512))
    c.model = ml_collections.ConfigDict(
        dict(
            pretrained="",  # an HF Llama/Qwen2 base model directory; empty: from scratch, sizes below
            vocab_size=0,
            hidden_size=512,
            intermediate_size=1536,
            num_layers=8,
            num_heads=8,
            num_kv_heads=4,
            rope_theta=10000.0,
            tie_embeddings=True,
            param_dtype="float32",  # fp32 master weights: a 3e-6 Adam step vanishes below bf16 resolution
            dtype="bfloat16",
            remat="full",
            attention_impl="xla",  # "chunked" (any platform), "splash" (TPU), "cudnn" (GPU): long sequences
            attention_block_size=512,  # queries and keys per block of "chunked" (and "splash")
        )
    )

    c.stages = ("grpo",)
    c.grpo = ml_collections.ConfigDict(
        dict(
            steps=1000,
            prompts_per_step=512,
            learning_rate=3e-6,
            warmup_steps=0,
            schedule="constant",
            weight_decay=0.0,
            max_grad_norm=1.0,
            top_p=1.0,
            top_k=0,
            reference_dtype="",  # π_ref's storage dtype; "" = the params', "bfloat16" halves it
            rewards=(("format", 0.5),),
            host_rewards=(("countdown", 1.0),),
            host_reward_timeout_s=5.0,
            eval_every=50,
            eval_at_start=True,
            eval_at_end=True,
            checkpoint_every=50,
            # rollouts pipelined up to this many updates ahead of the params they train (needs
            # algo.is_correction); 0: on-policy
            off_policy_steps=0,
            algo=ml_collections.ConfigDict(
                GRPOConfig.config_fields(
                    num_generations=16,
                    kl_coef=0.001,
                    clip_eps_low=0.2,
                    clip_eps_high=0.2,
                    num_iterations=1,
                    num_minibatches=16,
                    loss_agg="seq_mean_token_mean",
                    reference_reset_every=400,
                    temperature=1.0,
                )
            ),
        )
    )
    c.eval = ml_collections.ConfigDict(dict(num_problems=512, batch_size=64, k=8, temperature=1.0))
    c.checkpoint = ml_collections.ConfigDict(dict(keep_last=2, keep_best=1, async_save=True))
    c.debug = ml_collections.ConfigDict(dict(poison_step=-1, poison_grad_step=-1))

    if arg == "runlocal":
        c.mesh = (-1, 1, 1)
        c.task.update(train_size=64, test_size=4)
        c.tokenizer.vocab_size = 192
        c.model.update(
            hidden_size=32,
            intermediate_size=64,
            num_layers=1,
            num_heads=4,
            num_kv_heads=2,
            dtype="float32",
            remat="none",
        )
        c.max_prompt_len, c.max_new_tokens, c.max_answer_len = 192, 16, 16
        c.grpo.update(steps=2, prompts_per_step=2, eval_every=2, eval_at_start=False, checkpoint_every=1)
        c.grpo.algo.update(num_generations=4, num_minibatches=1)
        c.eval.update(num_problems=4, batch_size=4, k=2)
        c.progress_bar = False
    elif arg:
        raise ValueError(f"configs/r1_zero_countdown.py: unknown variant {arg!r} (known: runlocal)")
    return c
