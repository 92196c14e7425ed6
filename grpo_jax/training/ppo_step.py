"""The PPO-with-a-critic update (the baseline GRPO removes the critic from) as ONE jitted XLA program.

    step(state, batch) -> (state, metrics)

The critic V_ψ is as large as the policy (a copy of its backbone plus a scalar head) and lives in
`state.aux = {"value_params", "value_opt_state"}`, sharded like the policy. Inside one program:
reference logprobs (frozen π_ref, skipped when β = 0), in-graph rewards plus host rewards, old values
V_old from the critic, token rewards −β·KL_t(π_old ‖ π_ref) plus the outcome at the last token, GAE
advantages and returns, then μ × minibatch inner updates under `lax.scan`, each updating the policy
(clipped surrogate, token mean) and the critic (clipped value loss) with their own optimizers; an update
whose loss or either gradient norm is non-finite is skipped for both. Metrics are reduced on device.

Sources, one line each:
    PPO clipped surrogate: Schulman et al., arXiv 1707.06347 eq. 7.
    GAE: Schulman et al., arXiv 1506.02438 §3.
    Token rewards −β·KL_t + outcome at the end: InstructGPT, arXiv 2203.02155 eq. 2.
    PPO as the baseline GRPO drops the value model from: DeepSeekMath, arXiv 2402.03300 §4.1 eq. 1-2.
    Value clipping: OpenAI baselines ppo2, studied in arXiv 2005.12729.

The batch is exactly the GRPO step's (N rows, prompt-major; see `grpo_jax.training.grpo_step`):
    prompt_tokens [N, P], prompt_mask [N, P]          left-padded prompts
    completion_tokens [N, L], completion_mask [N, L]  sampled tokens, 1 up to and including the stop token
    loss_mask [N, L]                                  multi-turn rollouts: 0 on observation tokens (the
                                                      rewards, GAE, policy and value losses skip them;
                                                      the forwards read them; optional)
    old_logprobs [N, L]                               the sampler's logprobs (π_old)
    truncated [N] bool                                no stop token within the budget
    answer_tokens [N, A], answer_mask [N, A]          per-example targets for in-graph rewards (optional)
    route [N] int32                                   which routed rewards apply (optional)
    host_rewards [N] float32                          weighted sum of Python rewards (optional)
    poison () bool                                    debug switch: make this step's loss NaN (optional)
    poison_grad () bool                               debug switch: keep the loss finite, make its gradient
                                                      NaN (optional; see training.state.debug_poison)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from grpo_jax import models
from grpo_jax import sharding as shd
from grpo_jax.algorithms import (
    PPOConfig,
    gae_advantages,
    kl_divergence,
    masked_whiten,
    policy_loss,
    ppo_token_rewards,
    value_loss,
)
from grpo_jax.models.lora import attach, attach_backbone
from grpo_jax.rewards.reward_model import init_reward_head
from grpo_jax.training.grpo_step import RewardFn, completion_logprobs, loss_mask, outcome_rewards
from grpo_jax.training.minibatches import map_minibatches, to_minibatches
from grpo_jax.training.state import (
    DEBUG_KEYS,
    OptimizerConfig,
    TrainState,
    create_train_state,
    debug_poison,
    make_optimizer,
    reference_params,
    schedule_count,
)

# Batch keys the inner updates read (rewards, route and answers are consumed before them).
_TRAIN_KEYS = ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask", "old_logprobs")


# ----------------------------------------------------------------------------------------------
# The critic
# ----------------------------------------------------------------------------------------------


def _head_rng(rng: jax.Array) -> jax.Array:
    return jax.random.fold_in(rng, 0x7A1)


def create_value_params(model_config: models.ModelConfig, policy_params, rng: jax.Array) -> dict:
    """The critic V_ψ initialised from the policy: {"backbone": copy of the policy params, "head":
    scalar head [D] + bias}. As large as the policy: the memory GRPO saves. With LoRA the policy params
    are its adapters, so the critic is the same frozen base with adapters of its own plus the head."""
    return {
        "backbone": jax.tree_util.tree_map(jnp.copy, policy_params),
        "head": init_reward_head(model_config.hidden_size, rng),
    }


def value_shardings(mesh, model_config: models.ModelConfig, rules=None) -> dict:
    """Shardings of the value params: the backbone like the policy's params, the head replicated."""
    replicated = shd.replicated(mesh)
    return {
        "backbone": models.model_param_shardings(mesh, model_config, rules),
        "head": {"kernel": replicated, "bias": replicated},
    }


def make_value_optimizer(ppo: PPOConfig, opt_config: OptimizerConfig) -> optax.GradientTransformation:
    """The critic's optimizer: the policy's `opt_config` at `ppo.value_learning_rate` when that is set."""
    if ppo.value_learning_rate is not None:
        opt_config = dataclasses.replace(opt_config, learning_rate=ppo.value_learning_rate)
    return make_optimizer(opt_config)


def make_value_aux(model_config: models.ModelConfig, value_optimizer, rng: jax.Array):
    """`policy_params -> {"value_params", "value_opt_state"}`, the `aux` of `create_train_state`: traced
    inside its jit so the critic and its optimizer moments are created directly in their shardings."""

    def build(policy_params):
        value_params = create_value_params(model_config, policy_params, _head_rng(rng))
        return {"value_params": value_params, "value_opt_state": value_optimizer.init(value_params)}

    return build


def value_aux_shardings(
    mesh,
    model_config: models.ModelConfig,
    value_optimizer,
    rules=None,
    *,
    policy_shapes=None,
    policy_shardings=None,
) -> dict:
    """Shardings of `make_value_aux`'s output: optimizer moments sharded like the params they track,
    optimizer scalars (counts) replicated. `policy_shapes`/`policy_shardings`: the policy's trainable
    params when they are not the model's (LoRA adapters); default the model's."""
    if policy_shapes is None:
        policy_shapes = jax.eval_shape(functools.partial(models.init_params, model_config), jax.random.key(0))
    build_aux = make_value_aux(model_config, value_optimizer, jax.random.key(0))
    aux_shapes = jax.eval_shape(build_aux, policy_shapes)
    if policy_shardings is None:
        params_sh = value_shardings(mesh, model_config, rules)
    else:
        replicated = shd.replicated(mesh)
        params_sh = {"backbone": policy_shardings, "head": {"kernel": replicated, "bias": replicated}}
    opt_sh = optax.tree_map_params(
        value_optimizer,
        lambda _, s: s,
        aux_shapes["value_opt_state"],
        params_sh,
        transform_non_params=lambda _: shd.replicated(mesh),
    )
    return {"value_params": params_sh, "value_opt_state": opt_sh}


def create_ppo_state(
    policy_params,
    optimizer,
    value_optimizer,
    mesh,
    model_config: models.ModelConfig,
    *,
    rng: jax.Array,
    with_reference: bool,
    reward_params=None,
    reward_param_shardings=None,
    rules=None,
    reference_dtype=None,
    param_shardings=None,
    base=None,
    base_shardings=None,
    base_dtype: str = "",
) -> tuple[TrainState, TrainState]:
    """`create_train_state` with the critic in `aux`; returns (state, state_shardings). LoRA: the policy
    params are the adapters (`param_shardings` theirs) over `base` (see `create_train_state`), and the
    critic is the base with a copy of them plus its head."""
    if param_shardings is None:
        param_shardings = models.model_param_shardings(mesh, model_config, rules)
    lora_shapes = None if base is None else jax.eval_shape(lambda p: p, policy_params)
    return create_train_state(
        policy_params,
        optimizer,
        mesh,
        param_shardings,
        rng=rng,
        with_reference=with_reference,
        reference_dtype=reference_dtype,
        reward_params=reward_params,
        reward_param_shardings=reward_param_shardings,
        aux=make_value_aux(model_config, value_optimizer, rng),
        aux_shardings=value_aux_shardings(
            mesh,
            model_config,
            value_optimizer,
            rules,
            policy_shapes=lora_shapes,
            policy_shardings=None if base is None else param_shardings,
        ),
        base=base,
        base_shardings=base_shardings,
        base_dtype=base_dtype,
    )


def token_values(model_config: models.ModelConfig, value_params, batch: dict) -> jax.Array:
    """V_ψ at each completion token, float32 [N, L]: the head on the hidden state of the position whose
    logits predict that token (the one before it), so V_t values the state before o_t is emitted.

    One forward over prompt + completion [N, P + L]; the positions P − 1 .. P + L − 2 are read. The head
    runs in the compute dtype with a float32 result, so no float32 copy of the [N, L, D] hidden states
    is made.
    """
    prompt_tokens = batch["prompt_tokens"]
    tokens = jnp.concatenate([prompt_tokens, batch["completion_tokens"]], axis=1)
    mask = jnp.concatenate([batch["prompt_mask"], batch["completion_mask"]], axis=1)
    hidden = models.forward_hidden(model_config, value_params["backbone"], tokens, attention_mask=mask)
    start, length = prompt_tokens.shape[1] - 1, batch["completion_tokens"].shape[1]
    hidden = hidden[:, start : start + length]  # [N, L, D]
    head = value_params["head"]
    values = jnp.einsum(
        "nld,d->nl", hidden, head["kernel"].astype(hidden.dtype), preferred_element_type=jnp.float32
    )
    return values + head["bias"].astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Rollout targets and losses
# ----------------------------------------------------------------------------------------------


def ppo_targets(
    ppo: PPOConfig,
    model_config: models.ModelConfig,
    state: TrainState,
    batch: dict,
    *,
    reward_fn: RewardFn | None = None,
    logprob_chunk_size: int = 128,
    mesh=None,
) -> dict:
    """Everything the inner updates need from the rollout, computed once per step (no gradient).

    The reference logprobs and the critic's old values are computed one minibatch at a time
    (`minibatches.map_minibatches` over `ppo.num_minibatches`): their activations are those of N/M rows.

    Returns {"rewards" [N] outcome rewards, "per_reward" {name: [N]}, "kl" [N, L] KL_t(π_old ‖ π_ref)
    (zeros when β = 0), "token_rewards" [N, L], "old_values" [N, L], "advantages" [N, L] (whitened if
    configured), "returns" [N, L]}.
    """
    mask = loss_mask(batch)
    with jax.named_scope("reference_logprobs"):
        if ppo.kl_coef > 0:
            reference = reference_params(state)  # with LoRA: the base, adapters off
            if reference is None:
                raise ValueError("kl_coef > 0 needs a reference: create the state with with_reference=True")
            ref_logprobs = map_minibatches(
                functools.partial(
                    completion_logprobs,
                    model_config,
                    temperature=ppo.temperature,
                    chunk_size=logprob_chunk_size,
                ),
                reference,
                batch,
                ppo.num_minibatches,
                mesh,
            )
            kl = kl_divergence(ppo.kl_estimator, batch["old_logprobs"], jax.lax.stop_gradient(ref_logprobs))
            kl = jnp.where(mask > 0, kl, 0.0)
        else:
            kl = jnp.zeros(mask.shape, jnp.float32)

    with jax.named_scope("rewards"):
        rewards, per_reward = outcome_rewards(reward_fn, batch, state.reward_params)

    with jax.named_scope("old_values"):
        old_values = map_minibatches(
            functools.partial(token_values, model_config),
            attach_backbone(state.base, state.aux["value_params"]),
            batch,
            ppo.num_minibatches,
            mesh,
        )
        old_values = jax.lax.stop_gradient(old_values)

    with jax.named_scope("advantages"):
        token_rewards = ppo_token_rewards(rewards, kl, mask, ppo.kl_coef)
        advantages, returns = gae_advantages(token_rewards, old_values, mask, gamma=ppo.gamma, lam=ppo.lam)
        if ppo.whiten_advantages:
            advantages = masked_whiten(advantages, mask)

    return {
        "rewards": rewards,
        "per_reward": per_reward,
        "kl": kl,
        "token_rewards": token_rewards,
        "old_values": old_values,
        "advantages": advantages,
        "returns": returns,
    }


def ppo_policy_loss(params, mb: dict, *, ppo: PPOConfig, model_config, chunk_size: int = 128):
    """Negated clipped surrogate (PPO eq. 7) with per-token advantages [N, L], token mean, no KL term
    (β enters the rewards) -> (loss, metrics)."""
    logprobs, entropy = completion_logprobs(
        model_config, params, mb, temperature=ppo.temperature, chunk_size=chunk_size, with_entropy=True
    )
    loss, metrics = policy_loss(
        logprobs,
        mb["old_logprobs"],
        None,
        mb["advantages"],
        loss_mask(mb),
        clip_eps_low=ppo.clip_eps,
        clip_eps_high=ppo.clip_eps,
        kl_coef=0.0,
        loss_agg="token_mean",
        entropy=entropy,
    )
    return debug_poison(loss, mb), metrics


def critic_loss(value_params, mb: dict, *, ppo: PPOConfig, model_config):
    """Clipped value loss of V_ψ against the GAE returns on one minibatch -> (loss, metrics)."""
    values = token_values(model_config, value_params, mb)
    return value_loss(values, mb["old_values"], mb["returns"], loss_mask(mb), ppo.value_clip_eps)


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------


def make_ppo_step(
    ppo: PPOConfig,
    model_config: models.ModelConfig,
    optimizer: optax.GradientTransformation,
    value_optimizer: optax.GradientTransformation,
    *,
    reward_fn: RewardFn | None = None,
    mesh=None,
    state_shardings: TrainState | None = None,
    lr_schedule: optax.Schedule | None = None,
    logprob_chunk_size: int = 128,
    donate: bool = True,
):
    """Build the jitted `step(state, batch) -> (state, metrics)` (see the module docstring).

    `state` comes from `create_ppo_state` (critic in `state.aux`). `reward_fn(batch, reward_params) ->
    (total [N], {name: [N]})` runs in-graph; `host_rewards` are added to its total. `loss` in the metrics
    is the policy's loss; the critic's is `vf_loss`. Pass `state_shardings` to pin the output layout.
    """
    M = ppo.num_minibatches
    policy_loss_fn = functools.partial(
        ppo_policy_loss, ppo=ppo, model_config=model_config, chunk_size=logprob_chunk_size
    )
    value_loss_fn = functools.partial(critic_loss, ppo=ppo, model_config=model_config)
    # Gradients of the trainable params (with LoRA: the adapters, and the critic's adapters and head)
    # through `attach`, which leaves them unchanged without a base.
    policy_grad = jax.value_and_grad(lambda p, base, mb: policy_loss_fn(attach(base, p), mb), has_aux=True)
    value_grad = jax.value_and_grad(
        lambda vp, base, mb: value_loss_fn(attach_backbone(base, vp), mb), has_aux=True
    )

    def step(state: TrainState, batch: dict):
        batch = dict(batch)
        debug = {key: batch.pop(key) for key in DEBUG_KEYS if key in batch}
        mask = loss_mask(batch)
        n = mask.shape[0]
        if n % M:
            raise ValueError(f"batch of {n} rows does not split into {M} minibatches")

        targets = ppo_targets(
            ppo,
            model_config,
            state,
            batch,
            reward_fn=reward_fn,
            logprob_chunk_size=logprob_chunk_size,
            mesh=mesh,
        )
        train = {key: batch[key] for key in (*_TRAIN_KEYS, "loss_mask") if key in batch}
        train.update({key: targets[key] for key in ("advantages", "returns", "old_values")})
        minibatches = to_minibatches(train, M, mesh)

        def inner_update(carry, index):
            params, opt_state, value_params, value_opt_state = carry
            mb = jax.tree_util.tree_map(lambda x: x[index % M], minibatches)
            mb.update(debug)
            with jax.named_scope("policy_loss"):
                (loss, metrics), grads = policy_grad(params, state.base, mb)
            with jax.named_scope("value_loss"):
                (vf_loss, vf_metrics), value_grads = value_grad(value_params, state.base, mb)
            with jax.named_scope("optimizer"):
                grad_norm = optax.tree.norm(grads)
                value_grad_norm = optax.tree.norm(value_grads)
                finite = (
                    jnp.isfinite(loss)
                    & jnp.isfinite(grad_norm)
                    & jnp.isfinite(vf_loss)
                    & jnp.isfinite(value_grad_norm)
                )
                keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
                updates, new_opt_state = optimizer.update(grads, opt_state, params)
                new_params = optax.apply_updates(params, updates)
                params, opt_state = keep(new_params, params), keep(new_opt_state, opt_state)
                value_updates, new_value_opt_state = value_optimizer.update(
                    value_grads, value_opt_state, value_params
                )
                new_value_params = optax.apply_updates(value_params, value_updates)
                value_params = keep(new_value_params, value_params)
                value_opt_state = keep(new_value_opt_state, value_opt_state)
            metrics = dict(
                metrics,
                **vf_metrics,
                loss=loss,
                grad_norm=grad_norm,
                value_grad_norm=value_grad_norm,
                nonfinite=(~finite).astype(jnp.float32),
            )
            return (params, opt_state, value_params, value_opt_state), metrics

        aux = state.aux
        updates_before = schedule_count(state.opt_state, state.step * ppo.num_iterations * M)
        carry = (state.params, state.opt_state, aux["value_params"], aux["value_opt_state"])
        (params, opt_state, value_params, value_opt_state), inner = jax.lax.scan(
            inner_update, carry, jnp.arange(ppo.num_iterations * M)
        )

        with jax.named_scope("metrics"):
            rewards = targets["rewards"]
            lengths = jnp.sum(batch["completion_mask"], axis=-1).astype(jnp.float32)
            valid = (mask > 0).astype(jnp.float32)
            token_mean = lambda x: jnp.sum(x * valid) / jnp.maximum(jnp.sum(valid), 1.0)
            metrics = {
                "reward/mean": jnp.mean(rewards),
                "reward/std": jnp.std(rewards),
                "kl": token_mean(targets["kl"]),
                "kl_penalty": ppo.kl_coef * jnp.mean(jnp.sum(targets["kl"], axis=-1)),
                "advantage/mean_abs": token_mean(jnp.abs(targets["advantages"])),
                "returns/mean": token_mean(targets["returns"]),
                "value_mean": token_mean(targets["old_values"]),
                "completion_len/mean": jnp.mean(lengths),
                "completion_len/max": jnp.max(lengths),
                "truncated_frac": jnp.mean(batch["truncated"].astype(jnp.float32)),
                "nonfinite_updates": jnp.sum(inner["nonfinite"]),
                "ratio_max": jnp.max(inner["ratio_max"]),
            }
            for key in (
                "loss",
                "pg_loss",
                "clip_frac",
                "clip_frac_low",
                "clip_frac_high",
                "entropy",
                "grad_norm",
                "vf_loss",
                "vf_clip_frac",
                "value_grad_norm",
            ):
                metrics[key] = jnp.mean(inner[key])
            for name, value in targets["per_reward"].items():
                metrics[f"reward/{name}"] = jnp.mean(value)
            if lr_schedule is not None:
                metrics["learning_rate"] = lr_schedule(updates_before)  # at optax's count: skips excluded

        new_aux = dict(aux, value_params=value_params, value_opt_state=value_opt_state)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, aux=new_aux)
        return new_state, metrics

    jit_kwargs = {"donate_argnums": (0,) if donate else ()}
    if state_shardings is not None:
        jit_kwargs["out_shardings"] = (state_shardings, shd.replicated(mesh))
    return jax.jit(models.with_activation_sharding(step, mesh), **jit_kwargs)
