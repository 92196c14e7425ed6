"""The jitted SFT step (cold start, rejection-sampling SFT): next-token loss on completion tokens only.

Batch (from `grpo_jax.data.make_sft_dataset`): tokens [B, T], attention_mask [B, T], loss_mask [B, T]
(1 on completion tokens and EOS, aligned with `tokens`: the target at t is predicted from position t-1),
optionally poison () bool and poison_grad () bool (debug switches: make the loss NaN, or keep the loss
finite and make its gradient NaN; see `grpo_jax.training.state.debug_poison`).
"""

from __future__ import annotations

import jax

from grpo_jax import models
from grpo_jax.algorithms import sft_loss
from grpo_jax.models.lora import attach
from grpo_jax.sharding import replicated
from grpo_jax.training.state import TrainState, debug_poison, guarded_update


def sft_objective(params, batch, *, model_config, chunk_size: int = 128):
    """Token-mean NLL of the completion tokens: -> (loss, metrics)."""
    logprobs = models.token_logprobs(
        model_config, params, batch["tokens"], attention_mask=batch["attention_mask"], chunk_size=chunk_size
    )
    loss, metrics = sft_loss(logprobs, batch["loss_mask"][:, 1:])
    return debug_poison(loss, batch), metrics


def make_sft_step(
    model_config,
    optimizer,
    *,
    mesh=None,
    state_shardings=None,
    lr_schedule=None,
    chunk_size: int = 128,
    donate: bool = True,
):
    """`step(state, batch) -> (state, metrics)`; a non-finite loss or gradient skips the update (counted).
    With LoRA (`state.base` set) the gradient is the adapters' (`state.params`)."""

    def objective(params, base, batch):
        return sft_objective(attach(base, params), batch, model_config=model_config, chunk_size=chunk_size)

    def step(state: TrainState, batch):
        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params, state.base, batch)
        return guarded_update(state, grads, loss, optimizer, lr_schedule, metrics)

    kwargs = {"donate_argnums": (0,) if donate else ()}
    if state_shardings is not None:
        kwargs["out_shardings"] = (state_shardings, replicated(mesh))
    return jax.jit(models.with_activation_sharding(step, mesh), **kwargs)


def make_sft_eval(model_config, *, chunk_size: int = 128):
    """Jitted held-out loss: `eval(params, batch) -> metrics`."""
    return jax.jit(
        lambda params, batch: sft_objective(params, batch, model_config=model_config, chunk_size=chunk_size)[
            1
        ]
    )
