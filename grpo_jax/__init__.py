"""grpo_jax: GRPO, R1-Zero and R1 training for language models in JAX, one XLA program per RL update.

Public entry points (stable names, docs/CONTRACTS.md):
  grpo_jax.models.load_pretrained / forward           the Llama/Qwen2 policy
  grpo_jax.sampling.generate                           G completions per prompt with a KV cache
  grpo_jax.sampling.choose_tokens                      its per-step token choice (inverse CDF)
  grpo_jax.algorithms.grpo.group_advantages / policy_loss
  grpo_jax.rewards.math.extract_answer / is_equivalent
  grpo_jax.training.make_grpo_step                     the one-program GRPO update

Wherever a PRNG key is taken, a typed key (jax.random.key) and a raw one (jax.random.PRNGKey) are
alike; wherever a dtype is taken, a name ("bfloat16", "bf16") or a dtype (jnp.bfloat16) is
(grpo_jax.inputs).
"""

__version__ = "0.1.0"
