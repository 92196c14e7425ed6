"""The jitted reward-model (Bradley-Terry) and DPO steps on preference pairs, one XLA program each.

    rm_step(state, batch) -> (state, metrics)     state.params = {"backbone", "head"} (a reward model)
    dpo_step(state, batch) -> (state, metrics)    state.params = π_θ, state.ref_params = frozen π_ref

With LoRA (`state.base` set): the RM's params are {"backbone": adapters, "head"} over the frozen base, and
DPO's are the policy's adapters, π_ref being the base itself (`state.reference_params`).

The batch (from `grpo_jax.data.make_preference_dataset`; B pairs, T = max_len, right-padded):
    chosen_tokens, chosen_attention_mask, chosen_loss_mask        int32 [B, T]
    rejected_tokens, rejected_attention_mask, rejected_loss_mask  int32 [B, T]
    (loss masks are 1 on the completion tokens and EOS, aligned with the tokens, as in the SFT batch)
    truncated [B] bool, example_index [B] int32                   carried along, unused by the math
    poison () bool                                                 debug switch: make the loss NaN (optional)
    poison_grad () bool                                            debug switch: finite loss, NaN gradient
                                                                   (optional; see training.state.debug_poison)
    ref_chosen_logprobs, ref_rejected_logprobs [B] float32         DPO only, optional: precomputed reference
                                                                   sequence logprobs; skips the π_ref forward

Both sides of a pair go through ONE forward as [2B, T], interleaved (row 2i = chosen i, row 2i+1 =
rejected i) so each data shard keeps its own pairs and the interleave needs no cross-device traffic.
A non-finite loss or gradient skips the update (counted in `nonfinite_updates`), as in the SFT step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from grpo_jax import models
from grpo_jax import sharding as shd
from grpo_jax.algorithms import dpo_loss
from grpo_jax.models.lora import attach, attach_backbone
from grpo_jax.rewards.reward_model import init_reward_head, reward_model_loss, reward_model_scores
from grpo_jax.training.state import TrainState, debug_poison, guarded_update, reference_params


def _interleave(chosen: jax.Array, rejected: jax.Array) -> jax.Array:
    """[B, T] and [B, T] -> [2B, T] with row 2i = chosen i, row 2i+1 = rejected i."""
    return jnp.stack([chosen, rejected], axis=1).reshape(-1, *chosen.shape[1:])


def _pair_inputs(batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens, attention_mask, loss_mask), each [2B, T], interleaved."""
    return tuple(
        _interleave(batch[f"chosen_{name}"], batch[f"rejected_{name}"])
        for name in ("tokens", "attention_mask", "loss_mask")
    )


def _jit_step(step, mesh, state_shardings, donate):
    kwargs = {"donate_argnums": (0,) if donate else ()}
    if state_shardings is not None:
        kwargs["out_shardings"] = (state_shardings, shd.replicated(mesh))
    return jax.jit(models.with_activation_sharding(step, mesh), **kwargs)


# --------------------------------------------------------------------------------------------------
# Reward model: Bradley-Terry on pairs (InstructGPT, arXiv 2203.02155 eq. 1)
# --------------------------------------------------------------------------------------------------


def rm_param_shardings(mesh, model_config, rules=None):
    """Shardings of reward model params: the backbone like the policy (`model_param_shardings`), the scalar
    head ({"kernel": [D], "bias": []}) replicated."""
    replicated = shd.replicated(mesh)
    return {
        "backbone": models.model_param_shardings(mesh, model_config, rules),
        "head": {"kernel": replicated, "bias": replicated},
    }


def init_rm_params_from(policy_params, model_config, rng: jax.Array, *, copy: bool = True):
    """Reward model params `{"backbone": policy params, "head": init_reward_head}` (InstructGPT starts the
    RM from the SFT model). `copy` gives the backbone its own buffers, so a donating RM step never
    invalidates `policy_params`; pass False when the policy is not used afterwards."""
    backbone = jax.tree_util.tree_map(jnp.copy, policy_params) if copy else policy_params
    return {"backbone": backbone, "head": init_reward_head(model_config.hidden_size, rng)}


def rm_objective(params, batch, *, model_config):
    """Bradley-Terry loss of the pair batch: -> (loss, metrics rm/{accuracy, margin, chosen, rejected}).

    Scores r [2B] are read at each sequence's last real token (EOS) from one interleaved forward.
    """
    tokens, attention_mask, _ = _pair_inputs(batch)
    scores = reward_model_scores(model_config, params, tokens, attention_mask).reshape(-1, 2)  # [B, 2]
    loss, metrics = reward_model_loss(scores[:, 0], scores[:, 1])
    return debug_poison(loss, batch), jax.lax.stop_gradient(metrics)


def make_rm_step(
    model_config, optimizer, *, mesh=None, state_shardings=None, lr_schedule=None, donate: bool = True
):
    """`step(state, batch) -> (state, metrics)` training a reward model on preference pairs.

    Metrics: loss, rm/accuracy (share of pairs with r_chosen > r_rejected), rm/margin (mean r_c - r_r),
    rm/chosen, rm/rejected (mean scores), grad_norm, nonfinite_updates, learning_rate (with lr_schedule).
    """

    def objective(params, base, batch):
        return rm_objective(attach_backbone(base, params), batch, model_config=model_config)

    def step(state: TrainState, batch):
        with jax.named_scope("rm_loss"):
            (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
                state.params, state.base, batch
            )
        return guarded_update(state, grads, loss, optimizer, lr_schedule, metrics)

    return _jit_step(step, mesh, state_shardings, donate)


def make_rm_eval(model_config):
    """Jitted held-out pair metrics: `eval(params, batch) -> {loss, rm/accuracy, rm/margin, rm/chosen,
    rm/rejected}`."""

    def evaluate(params, batch):
        loss, metrics = rm_objective(params, batch, model_config=model_config)
        return dict(metrics, loss=loss)

    return jax.jit(evaluate)


# --------------------------------------------------------------------------------------------------
# DPO (arXiv 2305.18290 eq. 7)
# --------------------------------------------------------------------------------------------------


def sequence_logprobs(model_config, params, batch, *, chunk_size: int = 128) -> tuple[jax.Array, jax.Array]:
    """log π(y|x) of both sides: the masked sum of completion-token logprobs -> (chosen [B], rejected [B]).

    `token_logprobs` gives [2B, T-1] for targets tokens[:, 1:], so the loss mask aligns as loss_mask[:, 1:].
    """
    tokens, attention_mask, loss_mask = _pair_inputs(batch)
    logprobs = models.token_logprobs(
        model_config, params, tokens, attention_mask=attention_mask, chunk_size=chunk_size
    )  # [2B, T-1]
    per_sequence = jnp.sum(logprobs * loss_mask[:, 1:], axis=-1).reshape(-1, 2)  # [B, 2]
    return per_sequence[:, 0], per_sequence[:, 1]


def reference_logprobs(model_config, ref_params, batch, *, chunk_size: int = 128):
    """Frozen π_ref sequence logprobs (chosen [B], rejected [B]): the batch's precomputed ones if present."""
    if "ref_chosen_logprobs" in batch and "ref_rejected_logprobs" in batch:
        chosen, rejected = batch["ref_chosen_logprobs"], batch["ref_rejected_logprobs"]
    else:
        if ref_params is None:
            raise ValueError(
                "DPO needs a reference: state.ref_params is None (create the state with "
                "with_reference=True) and the batch has no ref_chosen_logprobs/ref_rejected_logprobs."
            )
        chosen, rejected = sequence_logprobs(model_config, ref_params, batch, chunk_size=chunk_size)
    return jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)


def dpo_objective(
    params, ref_chosen, ref_rejected, batch, *, model_config, beta, label_smoothing, chunk_size
):
    """DPO loss given the reference logprobs: -> (loss, metrics dpo/*)."""
    chosen, rejected = sequence_logprobs(model_config, params, batch, chunk_size=chunk_size)
    loss, stats = dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, beta=beta, label_smoothing=label_smoothing
    )
    metrics = {f"dpo/{k}": v for k, v in stats.items() if k != "loss"}
    metrics["dpo/logp_chosen"] = jax.lax.stop_gradient(jnp.mean(chosen))
    metrics["dpo/logp_rejected"] = jax.lax.stop_gradient(jnp.mean(rejected))
    return debug_poison(loss, batch), metrics


def _bound_dpo_objective(model_config, beta: float, label_smoothing: float, chunk_size: int):
    """`dpo_objective` with the run's settings bound (checked): `(params, ref_chosen, ref_rejected, batch)
    -> (loss, metrics)`, the step's and the held-out eval's one objective."""
    if not beta > 0:
        raise ValueError(f"DPO beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"DPO label_smoothing must be in [0, 0.5), got {label_smoothing}")
    return functools.partial(
        dpo_objective,
        model_config=model_config,
        beta=beta,
        label_smoothing=label_smoothing,
        chunk_size=chunk_size,
    )


def make_dpo_step(
    model_config,
    optimizer,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    mesh=None,
    state_shardings=None,
    lr_schedule=None,
    chunk_size: int = 128,
    donate: bool = True,
):
    """`step(state, batch) -> (state, metrics)`: one DPO update of π_θ against the frozen state.ref_params.

    beta: β, the strength of the implicit KL to π_ref (DPO paper 0.1); label_smoothing: ε of conservative
    DPO (0 = plain DPO). The reference forward runs once per batch in the same program, without gradient.

    Metrics: loss, dpo/reward_chosen, dpo/reward_rejected (mean implicit rewards β(log π − log π_ref)),
    dpo/reward_margin, dpo/reward_accuracy (share of pairs with a strictly higher chosen reward),
    dpo/logp_chosen, dpo/logp_rejected (mean policy sequence logprobs), grad_norm, nonfinite_updates,
    learning_rate (with lr_schedule).
    """
    bound = _bound_dpo_objective(model_config, beta, label_smoothing, chunk_size)

    def objective(params, base, ref_chosen, ref_rejected, batch):
        return bound(attach(base, params), ref_chosen, ref_rejected, batch)

    def step(state: TrainState, batch):
        with jax.named_scope("reference_logprobs"):
            ref_chosen, ref_rejected = reference_logprobs(
                model_config, reference_params(state), batch, chunk_size=chunk_size
            )
        with jax.named_scope("dpo_loss"):
            (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
                state.params, state.base, ref_chosen, ref_rejected, batch
            )
        return guarded_update(state, grads, loss, optimizer, lr_schedule, metrics)

    return _jit_step(step, mesh, state_shardings, donate)


def make_dpo_eval(model_config, *, beta: float, label_smoothing: float = 0.0, chunk_size: int = 128):
    """Jitted held-out DPO metrics: `eval(params, ref_params, batch) -> {loss, dpo/...}` (as the step's)."""
    objective = _bound_dpo_objective(model_config, beta, label_smoothing, chunk_size)

    def evaluate(params, ref_params, batch):
        ref_chosen, ref_rejected = reference_logprobs(model_config, ref_params, batch, chunk_size=chunk_size)
        loss, metrics = objective(params, ref_chosen, ref_rejected, batch)
        return dict(metrics, loss=loss)

    return jax.jit(evaluate)
