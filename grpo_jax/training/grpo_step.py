"""The whole GRPO update as ONE jitted XLA program.

    step(state, batch) -> (state, metrics)

Inside one program: reference logprobs (frozen π_ref, skipped when β = 0; with LoRA the base with the
adapters off), in-graph rewards plus host
rewards, group advantages on the GLOBAL batch (a group may span devices), dynamic sampling as a mask,
μ × minibatch inner updates under `lax.scan` (policy logprobs, ratio against π_old = the sampler's
logprobs, clipped surrogate + KL, grads, optax update), and on-device metric reduction.
Formulas: DeepSeekMath (arXiv 2402.03300) eq. 3-4 and §4.1; variants per `GRPOConfig`. Outcome
supervision gives one advantage per completion `[N]`; process supervision (`advantage_estimator="process"`,
§4.1.3) gives per-token advantages `[N, L]` from step rewards, while the outcome rewards are still logged.

The batch (N = prompts × G rows, prompt-major as the sampler emits them):
    prompt_tokens [N, P], prompt_mask [N, P]          left-padded prompts
    completion_tokens [N, L], completion_mask [N, L]  sampled tokens, 1 up to and including the stop token
    old_logprobs [N, L]                               the sampler's logprobs under the full softmax at the
                                                      rollout temperature (π_old)
    sampling_logprobs [N, L]                          the sampler's logprobs under the distribution it really
                                                      sampled from (top-p/top-k truncated; optional): the
                                                      π_sampler of `is_correction` and of the mismatch metrics
    loss_mask [N, L]                                  multi-turn rollouts: 1 on the policy's tokens, 0 on
                                                      observation tokens (in completion_mask: the forward
                                                      reads them; the loss, KL and entropy do not; optional)
    truncated [N] bool                                no stop token within the budget (`mask_truncated`
                                                      gives these rows sample weight 0)
    answer_tokens [N, A], answer_mask [N, A]          per-example targets for in-graph rewards (optional)
    route [N] int32                                   prompt kind of routed rewards (optional)
    host_rewards [N] float32                          weighted sum of Python rewards (optional)
    step_rewards [N, S] float32, step_mask [N, S],    process supervision (required iff advantage_estimator
    step_end_index [N, S] int32                       = "process"): each step's reward, 1 on real steps, and
                                                      the completion token where it ends (see
                                                      grpo_jax.rewards.process.process_step_rewards)
    fill [N] bool                                     rows standing in for a dynamic-sampling-with-refill
                                                      shortfall, or group places without a complete group
                                                      (partial rollouts): sample weight 0 (optional; see
                                                      grpo_jax.training.refill, grpo_jax.rollout.partial)
    behaviour_version [N, L] int32                    partial or pipelined (off_policy_steps) rollouts:
                                                      the policy version (state.step) whose forward drew
                                                      each token; only logged, as `staleness/*` (optional)
    poison () bool                                    debug switch: make this step's loss NaN (optional)
    poison_grad () bool                               debug switch: keep the loss finite, make its gradient
                                                      NaN (optional; see training.state.debug_poison)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from grpo_jax import models
from grpo_jax.algorithms import (
    GRPOConfig,
    compute_advantages,
    kl_divergence,
    policy_loss,
    process_advantages,
    zero_variance_groups,
)
from grpo_jax.algorithms.advantages import PROCESS_ESTIMATOR, process_zero_variance_groups
from grpo_jax.algorithms.grpo import aggregation_normaliser, masked_quantile
from grpo_jax.models.lora import attach
from grpo_jax.sharding import replicated
from grpo_jax.training.minibatches import from_minibatches, minibatch_logprobs, to_minibatches
from grpo_jax.training.state import DEBUG_KEYS, TrainState, debug_poison, reference_params, schedule_count

RewardFn = Callable[[dict, dict], tuple[jax.Array, dict[str, jax.Array]]]

PROCESS_KEYS = ("step_rewards", "step_mask", "step_end_index")
# Batch keys the policy loss never reads: kept out of the minibatch split. (`truncated` reaches the loss
# through `sample_weight`, computed on the whole batch before the split.)
_NOT_TRAINED = ("host_rewards", "truncated", "fill", "behaviour_version", *PROCESS_KEYS)
# Quantiles of the sampler/trainer ratio π_old/π_sampler logged every step.
_MISMATCH_QUANTILES = (("p01", 0.01), ("p50", 0.5), ("p99", 0.99))


def rollout_to_batch(rollout, prompt_batch: dict, num_generations: int, host_rewards=None) -> dict:
    """Assemble the step's batch from a sampler `Rollout` and the prompt batch it came from.

    Per-example targets ([B, ...] in `prompt_batch`) are repeated G times to line up with the rows.
    """
    repeat = lambda x: jnp.repeat(x, num_generations, axis=0)
    batch = {
        "prompt_tokens": rollout.prompt_tokens,
        "prompt_mask": rollout.prompt_mask,
        "completion_tokens": rollout.tokens,
        "completion_mask": rollout.mask,
        "old_logprobs": rollout.logprobs,
        "truncated": rollout.truncated,
    }
    if getattr(rollout, "loss_mask", None) is not None:
        batch["loss_mask"] = rollout.loss_mask
    if getattr(rollout, "sampling_logprobs", None) is not None:
        batch["sampling_logprobs"] = rollout.sampling_logprobs
    for key in ("answer_tokens", "answer_mask", "route"):
        if key in prompt_batch:
            batch[key] = repeat(jnp.asarray(prompt_batch[key]))
    if host_rewards is not None:
        batch["host_rewards"] = (
            host_rewards.astype(jnp.float32)
            if isinstance(host_rewards, jax.Array)
            else jnp.asarray(host_rewards, jnp.float32)
        )
    return batch


def outcome_rewards(reward_fn: RewardFn | None, batch: dict, reward_params) -> tuple[jax.Array, dict]:
    """In-graph rewards plus the batch's `host_rewards`: (total float32 [N], {name: [N]}, host as "host")."""
    n = batch["completion_mask"].shape[0]
    if reward_fn is not None:
        rewards, per_reward = reward_fn(batch, reward_params)
    else:
        rewards, per_reward = jnp.zeros((n,), jnp.float32), {}
    if "host_rewards" in batch:
        rewards = rewards + batch["host_rewards"]
        per_reward = dict(per_reward, host=batch["host_rewards"])
    return rewards.astype(jnp.float32), per_reward


def completion_logprobs(
    model_config, params, batch, *, temperature, chunk_size, with_entropy=False, shared_prefix_group=1
):
    """Logprobs (and entropies) [N, L] of the batch's completion tokens under `params`, at `temperature`.

    shared_prefix_group > 1: rows come in groups of that many consecutive rows continuing one prompt,
    whose forward is computed once per group (`models.completion_logprobs_shared_prefix`).
    """
    args = (model_config, params, batch["prompt_tokens"], batch["prompt_mask"])
    args += (batch["completion_tokens"], batch["completion_mask"])
    kwargs = dict(temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy)
    if shared_prefix_group > 1:
        return models.completion_logprobs_shared_prefix(*args, group_size=shared_prefix_group, **kwargs)
    return models.completion_logprobs(*args, **kwargs)


def loss_mask(batch: dict) -> jax.Array:
    """[N, L] the tokens the loss, the KL and the entropy count: `loss_mask` where a multi-turn rollout
    gave one (observation tokens 0: in the sequence the forward reads, not the policy's), else
    `completion_mask`."""
    return batch.get("loss_mask", batch["completion_mask"])


def _masked_mean(x, mask):
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def grpo_loss(
    params,
    mb: dict,
    *,
    grpo: GRPOConfig,
    model_config,
    chunk_size: int = 128,
    shared_prefix_group: int = 1,
    old_from_trainer: bool | None = None,
    with_logprobs: bool = False,
):
    """The GRPO objective on one minibatch (DeepSeekMath eq. 3) -> (loss, metrics); the step takes its
    grad. `with_logprobs`: (loss, (metrics, logprobs)), `logprobs` [N, L] being these params' logprobs of
    the completions (stop-gradient), for the mismatch metrics the step computes once per update.

    mb holds the batch keys plus `advantages` [N] or [N, L], `sample_weight` [N], when β > 0
    `ref_logprobs` [N, L], and under gradient accumulation `loss_normaliser` (the whole minibatch's
    aggregation denominator). shared_prefix_group: see `completion_logprobs`.

    Which logprobs are which (docs/ALGORITHMS.md): π_sampler = `sampling_logprobs` (else `old_logprobs`),
    what the rollout engine sampled from. π_old = `old_logprobs` (the sampler's full-softmax logprobs)
    unless `old_from_trainer` (None: `grpo.old_logprobs_from_trainer(model_config.dtype)`): then the
    trainer's logprobs at the rollout params, `trainer_old_logprobs`
    when the step precomputed them (μ > 1 or several minibatches), else these params' own logprobs under
    stop-gradient (μ = 1, one minibatch: the params have not moved yet). The PPO ratio is taken against
    π_old; an `is_correction` weighs the policy gradient by min(π_old/π_sampler, C) or IcePop's mask.
    """
    logprobs, entropy = completion_logprobs(
        model_config,
        params,
        mb,
        temperature=grpo.temperature,
        chunk_size=chunk_size,
        with_entropy=True,
        shared_prefix_group=shared_prefix_group,
    )
    sampler_logprobs = mb.get("sampling_logprobs", mb["old_logprobs"])
    if old_from_trainer is None:
        old_from_trainer = grpo.old_logprobs_from_trainer(model_config.dtype)
    if old_from_trainer:
        old_logprobs = mb.get("trainer_old_logprobs", jax.lax.stop_gradient(logprobs))
    else:
        old_logprobs = mb["old_logprobs"]
    loss, metrics = policy_loss(
        logprobs,
        old_logprobs,
        mb.get("ref_logprobs"),
        mb["advantages"],
        loss_mask(mb),
        clip_eps_low=grpo.clip_eps_low,
        clip_eps_high=grpo.clip_eps_high,
        kl_coef=grpo.loss_kl_coef,
        loss_agg=grpo.loss_agg,
        kl_estimator=grpo.kl_estimator,
        ratio_level=grpo.ratio_level,
        dual_clip_c=grpo.dual_clip_c,
        entropy=entropy,
        entropy_coef=grpo.entropy_coef,
        max_len_norm=grpo.max_len_norm,
        sample_weight=mb.get("sample_weight"),
        loss_type=grpo.loss_type,
        entropy_mask_top=grpo.entropy_mask_top,
        sampler_logprobs=sampler_logprobs,
        is_correction=grpo.is_correction,
        is_cap=grpo.is_cap,
        is_mask_low=grpo.is_mask_low,
        is_mask_high=grpo.is_mask_high,
        normaliser=mb.get("loss_normaliser"),
    )
    loss = debug_poison(loss, mb)
    metrics["entropy"] = _masked_mean(entropy, loss_mask(mb) > 0)
    if with_logprobs:
        return loss, (metrics, jax.lax.stop_gradient(logprobs))
    return loss, metrics


def mismatch_metrics(trainer_logprobs, sampler_logprobs, mask) -> dict[str, jax.Array]:
    """Sampler/trainer mismatch over the valid tokens: max and mean |log π_trainer − log π_sampler| and
    quantiles of the ratio π_trainer/π_sampler (`mismatch/ratio_p01`, `_p50`, `_p99`)."""
    valid = mask > 0
    diff = jnp.where(valid, trainer_logprobs - sampler_logprobs, 0.0)
    metrics = {
        "mismatch/abs_logp_diff_max": jnp.max(jnp.abs(diff)),
        "mismatch/abs_logp_diff_mean": _masked_mean(jnp.abs(diff), valid),
    }
    quantiles = masked_quantile(jnp.exp(diff), valid, jnp.asarray([q for _, q in _MISMATCH_QUANTILES]))
    for i, (name, _) in enumerate(_MISMATCH_QUANTILES):
        metrics[f"mismatch/ratio_{name}"] = quantiles[i]
    return metrics


def rollout_mismatch_metrics(trainer_logprobs, mb: dict) -> dict[str, jax.Array]:
    """What the first update's forward (at the rollout params) says about the rollout's logprobs:
    `sampler_logprob_diff` (max |π_trainer − the sampler's full-softmax logprobs|) and `mismatch/*`
    against π_sampler. Called once per step, on the rows of update 0."""
    valid = loss_mask(mb) > 0
    sampler_logprobs = mb.get("sampling_logprobs", mb["old_logprobs"])
    metrics = mismatch_metrics(trainer_logprobs, sampler_logprobs, valid)
    metrics["sampler_logprob_diff"] = jnp.max(
        jnp.where(valid, jnp.abs(trainer_logprobs - mb["old_logprobs"]), 0.0)
    )
    return metrics


def staleness_metrics(step, behaviour_version, mask, fill=None) -> dict[str, jax.Array]:
    """How many updates old the policy that drew each trained token is (partial rollouts): its lag
    `step − behaviour_version` over the valid tokens of the rows that are not `fill`: mean, max, and the
    fraction of tokens with a lag (drawn before the last update)."""
    valid = mask > 0
    if fill is not None:
        valid = valid & ~jnp.asarray(fill, bool)[:, None]
    lag = (step - behaviour_version).astype(jnp.float32)
    return {
        "staleness/mean": _masked_mean(lag, valid),
        "staleness/max": jnp.max(jnp.where(valid, lag, 0.0)),
        "staleness/stale_token_frac": _masked_mean((lag > 0).astype(jnp.float32), valid),
    }


def sample_weights(grpo: GRPOConfig, zero_variance, truncated, fill=None) -> tuple[jax.Array, jax.Array]:
    """Per-sequence loss weights [N] and which rows `mask_truncated` zeroed [N] bool.

    dynamic_sampling: groups whose rewards are all equal get 0 (DAPO §3.2); `fill` rows (a refill
    shortfall) get 0; mask_truncated: completions without a stop token within the budget get 0 (DAPO §3.4
    overlong filtering)."""
    weight = jnp.ones(zero_variance.shape, jnp.float32)
    if grpo.dynamic_sampling:
        weight = jnp.where(zero_variance, 0.0, weight)
    if fill is not None:
        weight = jnp.where(fill, 0.0, weight)
    truncated_masked = jnp.asarray(truncated, bool) & grpo.mask_truncated
    weight = jnp.where(truncated_masked, 0.0, weight)
    return weight, truncated_masked


def make_grpo_step(
    grpo: GRPOConfig,
    model_config: models.ModelConfig,
    optimizer: optax.GradientTransformation,
    *,
    reward_fn: RewardFn | None = None,
    mesh=None,
    state_shardings: TrainState | None = None,
    lr_schedule: optax.Schedule | None = None,
    logprob_chunk_size: int = 128,
    grad_accum_steps: int = 1,
    shared_prefix: bool = False,
    donate: bool = True,
):
    """Build the jitted `step(state, batch) -> (state, metrics)` (see the module docstring for the batch).

    `reward_fn(batch, reward_params) -> (total [N], {name: [N]})` runs in-graph (see
    `grpo_jax.rewards.make_reward_fns`); `host_rewards` in the batch are added to its total.
    `grad_accum_steps` splits each minibatch into equal micro-batches whose gradients add up to the
    minibatch's before one optimizer update: every micro-batch divides by the WHOLE minibatch's
    aggregation denominator (`aggregation_normaliser`: its token count for "token_mean", its sequence
    count otherwise), so loss and gradient equal the unaccumulated ones for every aggregation.
    Pass `state_shardings` to pin the output state to the input layout.
    `shared_prefix` computes each prompt's forward once per group, for the reference and the policy
    (exact: autodiff sums the G rows' gradients through the shared prompt); the rows of one prompt stay
    together in every minibatch and micro-batch when G divides by num_minibatches x grad_accum_steps.
    π_old is the sampler's logprobs or the trainer's recomputed ones (`GRPOConfig.old_logprobs_source`;
    "auto" recomputes when `model_config.dtype` is not float32).
    """
    G = grpo.num_generations
    M = grpo.num_minibatches
    process = grpo.advantage_estimator == PROCESS_ESTIMATOR
    needs_reference = grpo.kl_coef > 0
    old_from_trainer = grpo.old_logprobs_from_trainer(model_config.dtype)
    if shared_prefix and G % (M * grad_accum_steps):
        raise ValueError(
            f"shared_prefix needs num_generations={G} divisible by num_minibatches x grad_accum_steps "
            f"= {M} x {grad_accum_steps} (the rows of one prompt must stay together in each micro-batch)"
        )
    # Per minibatch (see `minibatch_logprobs`): with shared_prefix each minibatch holds G/M rows per prompt.
    logprobs_of = functools.partial(
        minibatch_logprobs,
        functools.partial(
            completion_logprobs,
            model_config,
            temperature=grpo.temperature,
            chunk_size=logprob_chunk_size,
            shared_prefix_group=G // M if shared_prefix else 1,
        ),
        num_minibatches=M,
        mesh=mesh,
    )

    loss_fn = functools.partial(
        grpo_loss,
        grpo=grpo,
        model_config=model_config,
        chunk_size=logprob_chunk_size,
        shared_prefix_group=G // (M * grad_accum_steps) if shared_prefix else 1,
        old_from_trainer=old_from_trainer,
        with_logprobs=True,
    )
    # The gradient is taken with respect to the trainable params (the adapters under LoRA) through
    # `attach`, which returns them unchanged without a base.
    grad_fn = jax.value_and_grad(lambda params, base, mb: loss_fn(attach(base, params), mb), has_aux=True)

    def accumulated_grads(params, base, mb):
        """((loss, (metrics, logprobs [N/M, L])), grads) of one minibatch, over its micro-batches."""
        if grad_accum_steps == 1:
            return grad_fn(params, base, mb)
        mb = dict(mb)
        mb["loss_normaliser"] = aggregation_normaliser(loss_mask(mb), grpo.loss_agg, mb.get("sample_weight"))
        micro = to_minibatches(
            {k: v for k, v in mb.items() if k not in (*DEBUG_KEYS, "loss_normaliser")}, grad_accum_steps, None
        )
        for key in (*DEBUG_KEYS, "loss_normaliser"):
            if key in mb:
                micro[key] = jnp.broadcast_to(mb[key], (grad_accum_steps,))

        def body(acc, one):
            (loss, (metrics, logprobs)), grads = grad_fn(params, base, one)
            return jax.tree_util.tree_map(jnp.add, acc, (loss, metrics, grads)), logprobs

        zeros = jax.tree_util.tree_map(
            jnp.zeros_like,
            jax.eval_shape(lambda: grad_fn(params, base, jax.tree_util.tree_map(lambda x: x[0], micro))),
        )
        init = (zeros[0][0], zeros[0][1][0], zeros[1])
        (loss, metrics, grads), logprobs = jax.lax.scan(body, init, micro)
        # loss and pg_loss add up over the micro-batches (one denominator); the other metrics are means.
        metrics = {k: v if k in ("loss", "pg_loss") else v / grad_accum_steps for k, v in metrics.items()}
        return (loss, (metrics, from_minibatches(logprobs))), grads

    def step(state: TrainState, batch: dict):
        batch = dict(batch)
        mask = loss_mask(batch)
        n = mask.shape[0]
        if n % (G * M) and n % M:
            raise ValueError(f"batch of {n} rows does not split into {M} minibatches")
        if process and any(k not in batch for k in PROCESS_KEYS):
            missing = [k for k in PROCESS_KEYS if k not in batch]
            raise ValueError(
                f"advantage_estimator='process' needs the batch keys {', '.join(missing)} "
                "(see grpo_jax.rewards.process.process_step_rewards)"
            )

        with jax.named_scope("reference_logprobs"):
            if needs_reference:
                reference = reference_params(state)  # with LoRA: the base, adapters off
                if reference is None:
                    raise ValueError(
                        "kl_coef > 0 needs a reference: create the state with with_reference=True"
                    )
                batch["ref_logprobs"] = jax.lax.stop_gradient(logprobs_of(reference, batch))

        with jax.named_scope("rewards"):
            rewards, per_reward = outcome_rewards(reward_fn, batch, state.reward_params)
            score = rewards
            if grpo.kl_in_reward and needs_reference:
                # where, not * mask: padded logprobs may hold anything, even -inf (then inf * 0 = NaN).
                token_kl = kl_divergence(grpo.kl_estimator, batch["old_logprobs"], batch["ref_logprobs"])
                seq_kl = jnp.sum(jnp.where(mask > 0, token_kl, 0.0), axis=-1)
                score = rewards - grpo.kl_coef * seq_kl

        with jax.named_scope("advantages"):
            if process:
                # DeepSeekMath §4.1.3: per-token advantages [N, L] from the step rewards.
                step_args = (batch["step_rewards"], batch["step_mask"], batch["step_end_index"])
                advantages = process_advantages(*step_args, G, mask.shape[1], **grpo.advantage_kwargs)
                zero_variance = process_zero_variance_groups(step_args[0], step_args[1], G)
            else:
                kwargs = dict(grpo.advantage_kwargs)
                if grpo.advantage_estimator == "reinforce_pp" and grpo.reinforce_pp_whiten == "token":
                    kwargs["token_counts"] = jnp.sum(mask, axis=-1)
                advantages = compute_advantages(grpo.advantage_estimator, score, G, **kwargs)
                # Judged on the outcome rewards, as refill's selection is: with kl_in_reward the score's
                # −β·KL term would make every group's scores differ.
                zero_variance = zero_variance_groups(rewards, G)
            weight, truncated_masked = sample_weights(
                grpo, zero_variance, batch["truncated"], batch.get("fill")
            )
            batch["advantages"] = advantages
            batch["sample_weight"] = weight

        if old_from_trainer and (grpo.num_iterations > 1 or M > 1):
            # π_old recomputed by the trainer at the rollout params, before any update (with μ = 1 and one
            # minibatch the loss takes them from its own forward instead).
            with jax.named_scope("old_logprobs"):
                batch["trainer_old_logprobs"] = jax.lax.stop_gradient(
                    logprobs_of(attach(state.base, state.params), batch)
                )

        debug = {key: batch.pop(key) for key in DEBUG_KEYS if key in batch}
        train_keys = [k for k in batch if k not in _NOT_TRAINED]
        minibatches = to_minibatches({k: batch[k] for k in train_keys}, M, mesh)

        def inner_update(carry, index):
            params, opt_state = carry
            mb = jax.tree_util.tree_map(lambda x: x[index % M], minibatches)
            mb.update(debug)
            with jax.named_scope("policy_loss"):
                (loss, (metrics, logprobs)), grads = accumulated_grads(params, state.base, mb)
            with jax.named_scope("mismatch_metrics"):
                # Update 0's forward is at the rollout params: the sampler/trainer mismatch, computed once.
                metrics.update(
                    jax.lax.cond(
                        index == 0,
                        lambda: rollout_mismatch_metrics(logprobs, mb),
                        lambda: jax.tree_util.tree_map(
                            jnp.zeros_like, jax.eval_shape(rollout_mismatch_metrics, logprobs, mb)
                        ),
                    )
                )
            with jax.named_scope("optimizer"):
                grad_norm = optax.tree.norm(grads)
                finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                updates, new_opt_state = optimizer.update(grads, opt_state, params)
                new_params = optax.apply_updates(params, updates)
                keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
                params, opt_state = keep(new_params, params), keep(new_opt_state, opt_state)
            metrics = dict(metrics, loss=loss, grad_norm=grad_norm, nonfinite=(~finite).astype(jnp.float32))
            return (params, opt_state), metrics

        updates_before = schedule_count(state.opt_state, state.step * grpo.num_iterations * M)
        (params, opt_state), inner = jax.lax.scan(
            inner_update, (state.params, state.opt_state), jnp.arange(grpo.num_iterations * M)
        )

        with jax.named_scope("metrics"):
            lengths = jnp.sum(batch["completion_mask"], axis=-1).astype(jnp.float32)
            mean_over_updates = lambda x: jnp.mean(x)
            metrics = {
                "reward/mean": jnp.mean(rewards),
                "reward/std": jnp.std(rewards),
                "advantage/mean_abs": (
                    _masked_mean(jnp.abs(advantages), mask) if process else jnp.mean(jnp.abs(advantages))
                ),
                "loss": mean_over_updates(inner["loss"]),
                "pg_loss": mean_over_updates(inner["pg_loss"]),
                "kl": mean_over_updates(inner["kl"]),
                "clip_frac": mean_over_updates(inner["clip_frac"]),
                "clip_frac_low": mean_over_updates(inner["clip_frac_low"]),
                "clip_frac_high": mean_over_updates(inner["clip_frac_high"]),
                "ratio_max": jnp.max(inner["ratio_max"]),
                "entropy": mean_over_updates(inner["entropy"]),
                "grad_norm": mean_over_updates(inner["grad_norm"]),
                "nonfinite_updates": jnp.sum(inner["nonfinite"]),
                "sampler_logprob_diff": inner["sampler_logprob_diff"][0],
                **{k: v[0] for k, v in inner.items() if k.startswith("mismatch/")},
                "old_logprobs_from_trainer": jnp.float32(old_from_trainer),
                "completion_len/mean": jnp.mean(lengths),
                "completion_len/max": jnp.max(lengths),
                "truncated_frac": jnp.mean(batch["truncated"].astype(jnp.float32)),
                "truncated_masked_frac": jnp.mean(truncated_masked.astype(jnp.float32)),
                "zero_variance_frac": jnp.mean(zero_variance.astype(jnp.float32)),
            }
            for name, value in per_reward.items():
                metrics[f"reward/{name}"] = jnp.mean(value)
            if process:
                step_mask = batch["step_mask"] > 0
                metrics["process/step_reward_mean"] = _masked_mean(batch["step_rewards"], step_mask)
                metrics["process/steps_per_sample"] = jnp.mean(
                    jnp.sum(step_mask, axis=-1).astype(jnp.float32)
                )
            for name in ("entropy_threshold", "entropy_mask_frac", "is_weight_mean", "is_zero_frac"):
                if name in inner:
                    metrics[name] = mean_over_updates(inner[name])
            if "behaviour_version" in batch:
                metrics.update(
                    staleness_metrics(state.step, batch["behaviour_version"], mask, batch.get("fill"))
                )
            if lr_schedule is not None:
                # The lr of this step's first update, at optax's own count (a skipped update does not
                # advance it), not at step × updates per step.
                metrics["learning_rate"] = lr_schedule(updates_before)

        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    jit_kwargs = {"donate_argnums": (0,) if donate else ()}
    if state_shardings is not None:
        jit_kwargs["out_shardings"] = (state_shardings, replicated(mesh))
    return jax.jit(models.with_activation_sharding(step, mesh), **jit_kwargs)
