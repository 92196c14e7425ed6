"""Direct Preference Optimization loss on sequence log-probabilities."""

import jax
import jax.numpy as jnp


def dpo_loss(
    policy_chosen_lp: jax.Array,
    policy_rejected_lp: jax.Array,
    ref_chosen_lp: jax.Array,
    ref_rejected_lp: jax.Array,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPO loss, mean over pairs (arXiv 2305.18290 eq. 7):
    `−log σ(β[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))])`.

    Every input is `[N]`: the log-probability of a whole completion, i.e. its masked token sum.
    label_smoothing ε assumes each preference label is flipped with probability ε (conservative DPO):
    the loss becomes `−(1 − ε) log σ(z) − ε log σ(−z)`.

    Metrics: loss, reward_chosen / reward_rejected (mean implicit rewards β(log π − log π_ref)),
    reward_margin (their mean difference), reward_accuracy (share of pairs where the chosen one's
    implicit reward is strictly higher).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_reward = beta * (policy_chosen_lp - ref_chosen_lp).astype(jnp.float32)  # [N]
    rejected_reward = beta * (policy_rejected_lp - ref_rejected_lp).astype(jnp.float32)  # [N]
    margin = chosen_reward - rejected_reward
    losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(margin) - label_smoothing * jax.nn.log_sigmoid(
        -margin
    )
    loss = jnp.mean(losses)
    metrics = {
        "loss": loss,
        "reward_chosen": jnp.mean(chosen_reward),
        "reward_rejected": jnp.mean(rejected_reward),
        "reward_margin": jnp.mean(margin),
        "reward_accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
    }
    return loss, jax.lax.stop_gradient(metrics)
