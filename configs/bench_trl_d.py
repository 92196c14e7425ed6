"""The peer benchmark's setting: a GRPO-only run shaped like TRL's `GRPOTrainer` run in
`benchmarks/peer_trl.py`, timed through `scripts/train.py` (`step_time_s` in metrics.jsonl).

    python scripts/train.py --config=configs/bench_trl_d.py --workdir=/tmp/bench_trl_d
    python scripts/train.py --config=configs/bench_trl_d.py:large --workdir=/tmp/bench_trl_d_large

A random Qwen2-style model (4 layers, hidden 256, 4 heads, 2 KV heads, MLP 688, vocab 512, untied
embeddings, fp32; `:large` = 8 layers, hidden 512, 8 heads, 4 KV heads, MLP 1376), 8 prompts x G = 8
completions per step, every prompt 32 tokens (left-padded to 32: static shapes compute all 32), exactly 64
completion tokens (stop tokens suppressed until then), β = 0.04 with the reference forward, μ = 1, AdamW,
temperature 1, PPO clip 0.2, DAPO token-mean loss (TRL's defaults), remat="dots"; no eval and no
checkpoint during the timed steps. The task is the quickstart's synthetic arithmetic; its rewards are the
quickstart's. What is measured is the step, not learning: the model starts random.
`:runlocal` shrinks it to a seconds-long smoke run (the tests).
"""

import ml_collections

from grpo_jax.config_utils import quickstart_first_recipe, sibling_config

SETTINGS = {
    "small": dict(num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=688),
    "large": dict(num_layers=8, hidden_size=512, num_heads=8, num_kv_heads=4, intermediate_size=1376),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "large", "runlocal"):
        raise ValueError(f"configs/bench_trl_d.py: unknown variant {arg!r} (known: large, runlocal)")
    c = quickstart_first_recipe(sibling_config(__file__, "quickstart.py"))
    c.max_prompt_len = 32
    c.max_new_tokens = 64
    c.logprob_chunk_size = 96
    c.progress_bar = False
    c.tensorboard = False
    c.model.update(
        vocab_size=512,
        tie_embeddings=False,
        rope_theta=1_000_000.0,
        param_dtype="float32",
        dtype="float32",
        # Saves the matmul outputs and recomputes the cheap elementwise ops in the backward. On CPU that
        # avoids stacking the elementwise residuals across the layer scan (a zero-fill, a write and a read
        # per layer); benchmarks/peer_trl.md has the profile and the timing against "none".
        remat="dots",
        **SETTINGS["large" if arg == "large" else "small"],
    )
    c.stages = ("grpo",)
    c.grpo.update(
        steps=12,
        prompts_per_step=8,
        min_new_tokens=64,  # the whole completion: stop tokens suppressed, every row 64 tokens
        learning_rate=1e-6,
        warmup_steps=0,
        schedule="constant",
        eval_every=0,
        eval_at_end=False,
        checkpoint_every=1_000_000,  # none during the timed steps (the stage's final save comes after)
    )
    c.grpo.algo.update(
        num_generations=8,
        kl_coef=0.04,
        clip_eps_low=0.2,
        clip_eps_high=0.2,
        num_iterations=1,
        loss_agg="token_mean",
        temperature=1.0,
    )
    if arg == "runlocal":
        c.model.update(num_layers=1, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64)
        c.max_new_tokens = 8
        c.grpo.update(steps=2, prompts_per_step=2, min_new_tokens=8)
        c.grpo.algo.num_generations = 4
    return c
