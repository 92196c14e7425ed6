"""Supervised fine-tuning loss: negative log-likelihood of the target tokens."""

import jax
import jax.numpy as jnp


def sft_loss(logprobs: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-mean NLL over the mask: `−Σ m·log p / Σ m` (every target token weighs the same).

    logprobs `[N, T]`: log-probabilities of the target tokens; mask `[N, T]`: 1 on tokens to learn
    (the completion), 0 on prompt and padding, where logprobs may hold any value. An all-zero mask gives
    loss 0. Metrics: loss, perplexity (exp of the loss), num_tokens.
    """
    mask = jnp.asarray(mask, jnp.float32)
    logprobs = jnp.where(mask > 0, logprobs.astype(jnp.float32), 0.0)
    num_tokens = jnp.sum(mask)
    loss = -jnp.sum(logprobs * mask) / jnp.where(num_tokens > 0, num_tokens, 1.0)
    metrics = {"loss": loss, "perplexity": jnp.exp(loss), "num_tokens": num_tokens}
    return loss, jax.lax.stop_gradient(metrics)
