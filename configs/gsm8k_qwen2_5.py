"""GRPO on GSM8K from a Qwen2.5 checkpoint (R1-Zero style: no SFT, rule rewards only).

    python scripts/train.py --config=configs/gsm8k_qwen2_5.py --workdir=/tmp/gsm8k_qwen \
        --config.model.pretrained=/path/to/Qwen2.5-1.5B \
        --config.task.train_file=/path/to/gsm8k/train.jsonl --config.task.test_file=/path/to/gsm8k/test.jsonl

GSM8K JSONL lines are `{"question": ..., "answer": "... #### 42"}` (the openai/gsm8k files). The policy
answers under the R1-Zero template (`--config.template=chat` for an instruct model's chat template) and
is rewarded for the tag format (in-graph `format`, weight 0.5) and for an answer equivalent to the gold one
(host, `math_accuracy`, weight 1). Nothing is downloaded: the model directory and both data files are
given by flags. Sizes are for one TPU v4-8 / 8-GPU host with Qwen2.5-1.5B: params and optimizer state
sharded over every device (fsdp), bf16 compute over fp32 master weights, full remat.

The format reward runs inside the compiled step although Qwen2.5's tokenizer splits <think>/<answer> into
several tokens ("<th" "ink" ">\\n", "><", ">-" ...): the in-graph rewards match each tag as every token
sequence that spells it (grpo_jax/rewards/in_graph.py). Accuracy stays on the host: GSM8K answers are
integers, but models write "$18", "18 dollars", "18." or \\boxed{18}, which `math_accuracy` normalises
and the in-graph `accuracy_numeric` (a bare integer between the tags) scores 0; swap them with
`--config.grpo.rewards` / `--config.grpo.host_rewards` to keep everything in the step.
`:runlocal` is a seconds-long CPU run for the tests: it still needs the three paths, pointing at a tiny
random Qwen2 directory (with a `tokenizer.model`) and tiny JSONL files that the test writes.
"""

import ml_collections

from grpo_jax.algorithms.config import GRPOConfig
from grpo_jax.config_utils import add_lora


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = (1, -1, 1)  # (data, fsdp, tensor)
    # the sampler's own (replica, tensor) mesh over the last devices, config.mesh over the rest;
    # None: co-located (docs/ARCHITECTURE.md, "Asynchronous GRPO")
    c.sampler_mesh = ml_collections.config_dict.placeholder(tuple)
    c.dcn_mesh = (1, 1, 1)  # slices each mesh axis spans (multislice: e.g. (2, 1, 1), data over 2)
    c.template = "r1_zero"
    c.max_prompt_len = 320
    c.max_new_tokens = 768
    c.max_answer_len = 16
    c.logprob_chunk_size = 64  # [rows, 64, 152k] logits per chunk (larger chunks: benchmarks/tpu_aot.md)
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
            name="gsm8k",
            kwargs=dict(),
            train_size=0,  # 0: every line of the file
            test_size=0,
            train_file="",  # required: GSM8K train JSONL
            test_file="",  # required: GSM8K test JSONL
        )
    )
    c.tokenizer = ml_collections.ConfigDict(dict(path="", vocab_size=0))  # the model directory's tokenizer
    c.model = ml_collections.ConfigDict(
        dict(
            pretrained="",  # required: HF Qwen2.5 directory (config.json + *.safetensors + tokenizer.json)
            vocab_size=0,
            hidden_size=0,  # the fields below are only read without `pretrained`; the HF config.json wins
            intermediate_size=0,
            num_layers=0,
            num_heads=0,
            num_kv_heads=0,
            rope_theta=1000000.0,
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
            steps=500,
            prompts_per_step=64,
            learning_rate=3e-6,
            warmup_steps=10,
            schedule="constant",
            weight_decay=0.0,
            max_grad_norm=1.0,
            top_p=1.0,
            top_k=0,
            reference_dtype="",  # π_ref's storage dtype; "" = the params', "bfloat16" halves it
            grad_accum_steps=1,  # micro-batches per minibatch update (memory, not math)
            rewards=(("format", 0.5),),
            host_rewards=(("math_accuracy", 1.0),),
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
                    clip_eps_high=0.28,
                    num_iterations=1,
                    num_minibatches=4,
                    loss_agg="seq_mean_token_mean",
                    reference_reset_every=0,
                    temperature=1.0,
                )
            ),
        )
    )
    # Greedy accuracy on the whole test split during training; pass@k / maj@k with scripts/evaluate.py.
    c.eval = ml_collections.ConfigDict(dict(num_problems=1319, batch_size=128, k=0, temperature=0.6))
    c.checkpoint = ml_collections.ConfigDict(dict(keep_last=2, keep_best=1, async_save=True))
    c.debug = ml_collections.ConfigDict(dict(poison_step=-1, poison_grad_step=-1))

    if arg == "runlocal":
        c.mesh = (-1, 1, 1)
        c.model.update(dtype="float32", remat="none")
        c.max_prompt_len, c.max_new_tokens = 64, 16
        c.grpo.update(
            steps=2, prompts_per_step=2, eval_every=2, eval_at_start=False, checkpoint_every=1, warmup_steps=0
        )
        c.grpo.algo.update(num_generations=4, num_minibatches=1)
        c.eval.update(num_problems=4, batch_size=4)
        c.progress_bar = False
    elif arg:
        raise ValueError(f"configs/gsm8k_qwen2_5.py: unknown variant {arg!r} (known: runlocal)")
    # LoRA off by default: `--config.grpo.lora=True --config.lora.rank=32 --config.lora.base_dtype=bfloat16`
    # trains adapters over the frozen pretrained model instead (docs/ARCHITECTURE.md, LoRA).
    return add_lora(c, rank=32, base_dtype="bfloat16")
