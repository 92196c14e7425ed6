"""The PPO baseline's critic-side math: token rewards, generalised advantage estimation, value loss.

PPO for language models (InstructGPT-style, as in DeepSeekMath §4.1 and docs/ALGORITHMS.md) learns a value
V_t per token; GRPO's point is to drop it. Shapes: N sequences, T completion tokens, right-padded, with
`mask` 1 on real tokens. A sequence ends at its last real token: no value is bootstrapped past it.
"""

import jax
import jax.numpy as jnp


def ppo_token_rewards(outcome: jax.Array, kl: jax.Array, mask: jax.Array, kl_coef: float) -> jax.Array:
    """Per-token rewards `[N, T]`: −β·KL_t on every real token plus the outcome reward on the last one.

    (Ouyang et al., arXiv 2203.02155 eq. 2, per token.) outcome `[N]`; kl `[N, T]` per-token KL to the
    reference (e.g. `kl_k1`). A sequence with an all-zero mask gets no reward at all.
    """
    mask = jnp.asarray(mask, jnp.float32)
    num_tokens = mask.shape[1]
    valid = mask > 0
    token_rewards = jnp.where(valid, -kl_coef * kl.astype(jnp.float32), 0.0)
    last_index = num_tokens - 1 - jnp.argmax(jnp.flip(valid, axis=1), axis=1)  # [N]
    is_last = jax.nn.one_hot(last_index, num_tokens, dtype=jnp.float32) * jnp.any(valid, axis=1)[:, None]
    return token_rewards + is_last * jnp.asarray(outcome, jnp.float32)[:, None]


def gae_advantages(
    rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al., arXiv 1506.02438 §3), reverse `lax.scan`.

    δ_t = r_t + γ V_{t'} − V_t and Â_t = δ_t + γλ Â_{t'}, t' being the next real token after t: the last
    real token is terminal. `mask` may have interior holes (a multi-turn row's observation tokens, loss
    mask 0): a hole is skipped, the value and advantage of the token after it carried across as if the
    policy's tokens were adjacent (verl's multi-turn GAE). Right-padded rows are the plain recursion.
    Returns (advantages `[N, T]`, returns = Â + V `[N, T]`), both 0 on masked tokens.
    """
    mask = jnp.asarray(mask, jnp.float32)
    valid = mask > 0
    rewards = jnp.where(valid, rewards.astype(jnp.float32), 0.0)
    values = jnp.where(valid, values.astype(jnp.float32), 0.0)

    def backward_step(carry, inputs):  # carries (V, Â) of the next real token, 0 after the last
        next_value, next_advantage = carry
        reward, value, real = inputs
        advantage = reward + gamma * next_value - value + gamma * lam * next_advantage
        carry = (jnp.where(real, value, next_value), jnp.where(real, advantage, next_advantage))
        return carry, advantage

    zeros = jnp.zeros(rewards.shape[0], jnp.float32)
    _, advantages = jax.lax.scan(backward_step, (zeros, zeros), (rewards.T, values.T, valid.T), reverse=True)
    advantages = jnp.where(valid, advantages.T, 0.0)
    returns = jnp.where(valid, advantages + values, 0.0)
    return advantages, returns


def masked_whiten(values: jax.Array, mask: jax.Array, *, eps: float = 1e-8) -> jax.Array:
    """(x − mean) / (std + eps) over the masked entries, 0 elsewhere; PPO's advantage normalisation.

    The variance is the population one (divided by n, the masked count); verl and TRL divide by n − 1,
    a factor sqrt(n / (n − 1)) on the std that vanishes at a batch's token counts (docs/ALGORITHMS.md)."""
    mask = jnp.asarray(mask, jnp.float32)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    mean = jnp.sum(values * mask) / count
    variance = jnp.sum(jnp.square(values - mean) * mask) / count
    return jnp.where(mask > 0, (values - mean) / (jnp.sqrt(variance) + eps), 0.0)


def value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    clip_eps: float | None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped value loss `½ max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²)`, token mean over the mask.

    (Value clipping of OpenAI baselines' ppo2, studied in arXiv 2005.12729.) `clip_eps=None` gives the
    plain squared error. Metrics: vf_loss, vf_clip_frac (share of tokens where the clipped term is
    larger), value_mean. The clipped value is clip(V, V_old − ε, V_old + ε), which is V itself inside the
    band: written V_old + clip(V − V_old, ±ε) it rounds one ulp off V there, and such tokens were counted
    as clipped.
    """
    mask = jnp.asarray(mask, jnp.float32)
    valid = mask > 0
    values = jnp.where(valid, values.astype(jnp.float32), 0.0)
    old_values = jnp.where(valid, old_values.astype(jnp.float32), 0.0)
    returns = jnp.where(valid, returns.astype(jnp.float32), 0.0)
    unclipped = jnp.square(values - returns)
    if clip_eps is None:
        per_token = unclipped
        clipped_active = jnp.zeros_like(unclipped, dtype=bool)
    else:
        clipped_values = jnp.clip(values, old_values - clip_eps, old_values + clip_eps)
        clipped = jnp.square(clipped_values - returns)
        per_token = jnp.maximum(unclipped, clipped)
        clipped_active = clipped > unclipped
    num_tokens = jnp.sum(mask)
    token_mean = lambda x: jnp.sum(x * mask) / jnp.where(num_tokens > 0, num_tokens, 1.0)
    loss = 0.5 * token_mean(per_token)
    metrics = {"vf_loss": loss, "vf_clip_frac": token_mean(clipped_active), "value_mean": token_mean(values)}
    return loss, jax.lax.stop_gradient(metrics)
