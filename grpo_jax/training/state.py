"""Train state and optimizer: a plain pytree placed on the mesh with explicit shardings."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from grpo_jax import sharding as shd
from grpo_jax.inputs import canonical_dtype
from grpo_jax.models.lora import FrozenBase, attach, cast_base
from grpo_jax.train_state import TrainState

# Debug batch keys (0-d bool) that the SFT and GRPO steps read to exercise their non-finite guard
# (`finite = isfinite(loss) & isfinite(grad_norm)`), one half each; see `debug_poison`.
POISON_LOSS, POISON_GRAD = "poison", "poison_grad"
DEBUG_KEYS = (POISON_LOSS, POISON_GRAD)


@jax.custom_vjp
def _nan_gradient_if(x: jax.Array, poison: jax.Array) -> jax.Array:
    return x


def _nan_gradient_if_fwd(x, poison):
    return x, poison


def _nan_gradient_if_bwd(poison, g):
    return jnp.where(poison, jnp.nan, 1.0).astype(g.dtype) * g, None


_nan_gradient_if.defvjp(_nan_gradient_if_fwd, _nan_gradient_if_bwd)


def debug_poison(loss: jax.Array, batch) -> jax.Array:
    """Apply the batch's debug switches to a scalar loss (both absent or False: `loss` unchanged).

    `poison` (config.debug.poison_step): the loss becomes NaN. `poison_grad` (config.debug.poison_grad_step):
    the loss keeps its finite value but every gradient through it becomes NaN, so only the
    `isfinite(grad_norm)` half of the guard can catch it.
    """
    if POISON_LOSS in batch:
        loss = loss + jnp.where(batch[POISON_LOSS], jnp.nan, 0.0)
    if POISON_GRAD in batch:
        loss = _nan_gradient_if(loss, jnp.asarray(batch[POISON_GRAD]))
    return loss


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW with linear warmup then constant or cosine decay, after a global-norm clip.

    learning_rate: peak lr (DeepSeekMath 1e-6, R1 3e-6); warmup_steps / total_steps count optimizer
    updates; schedule: "constant" | "cosine"; max_grad_norm: None = no clip.
    """

    learning_rate: float = 1e-6
    warmup_steps: int = 0
    total_steps: int = 1000
    schedule: str = "constant"
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ValueError(f"OptimizerConfig.learning_rate must be > 0, got {self.learning_rate}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(
                f"OptimizerConfig.schedule must be 'constant' or 'cosine', got {self.schedule!r}"
            )
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError(
                f"OptimizerConfig: warmup_steps >= 0 and total_steps >= 1 required, got "
                f"{self.warmup_steps}, {self.total_steps}"
            )


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    """lr at optimizer update `count`: linear 0 -> peak over `warmup_steps` (none when 0: the first update
    already gets the peak), then constant, or cosine down to 0.1 x peak at `total_steps` and flat after."""
    warmup = max(config.warmup_steps, 0)
    if config.schedule == "cosine" and warmup == 0:
        # Plain cosine from the peak: a 1-step warmup would give update 0 lr 0, a wasted update.
        return optax.cosine_decay_schedule(config.learning_rate, config.total_steps, alpha=0.1)
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0,
            config.learning_rate,
            warmup,
            max(config.total_steps, warmup + 1),
            0.1 * config.learning_rate,
        )
    if warmup == 0:
        return optax.constant_schedule(config.learning_rate)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, config.learning_rate, warmup),
            optax.constant_schedule(config.learning_rate),
        ],
        [warmup],
    )


def schedule_count(opt_state, default):
    """Optimizer updates applied so far: the count of optax's learning-rate schedule state (`default`
    for an optimizer without one, e.g. a constant-rate optax.adam). A skipped (non-finite) update leaves
    the optimizer state, and so this count, where it was; a step logs `learning_rate` at this count."""
    counts = [
        leaf.count
        for leaf in jax.tree_util.tree_leaves(
            opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState)
        )
        if isinstance(leaf, optax.ScaleByScheduleState)
    ]
    if len(counts) > 1:
        raise ValueError(f"expected one learning-rate schedule in the optimizer state, found {len(counts)}")
    return counts[0] if counts else default


def guarded_update(state: TrainState, grads, loss, optimizer, lr_schedule, metrics):
    """One optax update of `state.params`, kept only when the loss and the gradient norm are finite (a
    skipped update is counted in `nonfinite_updates`); adds `loss`, `grad_norm` and `learning_rate` (at
    the optimizer's own count) to `metrics`. The SFT, reward-model and DPO steps share it."""
    with jax.named_scope("optimizer"):
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = state.replace(
            step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state)
        )
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, nonfinite_updates=(~finite).astype(jnp.float32))
    if lr_schedule is not None:
        metrics["learning_rate"] = lr_schedule(schedule_count(state.opt_state, state.step))
    return new_state, metrics


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    parts = []
    if config.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(config.max_grad_norm))
    parts.append(
        optax.adamw(
            learning_rate_schedule(config),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
        )
    )
    return optax.chain(*parts)


def state_shardings(
    state_shapes: TrainState,
    param_shardings,
    optimizer,
    mesh,
    *,
    reward_param_shardings=None,
    aux_shardings=None,
    base_shardings=None,
) -> TrainState:
    """Shardings of a TrainState: params/ref like the policy params, optimizer moments like their params,
    reward params and aux as given (default: replicated), a LoRA base as given (its params' shardings),
    everything else replicated."""
    replicated = shd.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        optimizer,
        lambda _, s: s,
        state_shapes.opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=opt_shardings,
        ref_params=None if state_shapes.ref_params is None else param_shardings,
        reward_params=(
            jax.tree_util.tree_map(lambda _: replicated, state_shapes.reward_params)
            if reward_param_shardings is None
            else reward_param_shardings
        ),
        rng=replicated,
        aux=(
            jax.tree_util.tree_map(lambda _: replicated, state_shapes.aux)
            if aux_shardings is None
            else aux_shardings
        ),
        base=None if state_shapes.base is None else base_shardings,
    )


def train_state_builder(
    optimizer, *, with_reference: bool = True, reference_dtype=None, aux=None, base_dtype=""
):
    """The pure function `(params, rng, reward_params, aux, base) -> TrainState` that `create_train_state`
    jits (and `scripts/aot_compile.py` traces abstractly, so it compiles the state the trainer builds).

    `base`: a LoRA stage's `FrozenBase` (None: full fine-tuning), stored in `base_dtype`; then `params`
    are the adapters and `with_reference` gives the reference adapters of its own (an iterative-GRPO
    reset needs them), not a copy of the model."""

    def build(p, key, rp, ax, base):
        return TrainState(
            step=jnp.asarray(0, jnp.int32),
            params=p,
            opt_state=optimizer.init(p),
            ref_params=reference_copy(p, reference_dtype) if with_reference else None,
            reward_params=rp,
            rng=key,
            aux=aux(p) if callable(aux) else ax,
            base=None if base is None else base.replace(params=cast_base(base.params, base_dtype)),
        )

    return build


def create_train_state(
    params,
    optimizer,
    mesh,
    param_shardings,
    *,
    rng,
    with_reference: bool = True,
    reward_params=None,
    reward_param_shardings=None,
    aux=None,
    aux_shardings=None,
    reference_dtype=None,
    base: FrozenBase | None = None,
    base_shardings: FrozenBase | None = None,
    base_dtype: str = "",
) -> tuple[TrainState, TrainState]:
    """Build the train state directly in its shardings; returns (state, state_shardings).

    The reference starts as a copy of the policy (DeepSeekMath: π_ref ← π_θ at the start of each
    iteration); `reference_dtype` (e.g. "bfloat16") stores it in that dtype instead of the params', half
    the frozen copy's memory for an fp32 policy (its forward computes in the model's compute dtype
    either way). The optimizer state is created inside a jit with `out_shardings`, never unsharded.
    `aux` is a pytree (or a function `params -> pytree`, traced inside the same jit, e.g. to build a
    critic's optimizer state) placed with `aux_shardings` (default: replicated).
    LoRA: `params` are the adapters (with their shardings) and `base` the frozen model (`FrozenBase`,
    `base_shardings` the same structure of shardings), stored in `base_dtype` ("" = as given); see
    `train_state_builder`.
    """
    reward_params = {} if reward_params is None else reward_params
    aux_tree = None if callable(aux) else ({} if aux is None else aux)
    build = train_state_builder(
        optimizer,
        with_reference=with_reference,
        reference_dtype=reference_dtype,
        aux=aux,
        base_dtype=base_dtype,
    )
    shapes = jax.eval_shape(build, params, rng, reward_params, aux_tree, base)
    shardings = state_shardings(
        shapes,
        param_shardings,
        optimizer,
        mesh,
        reward_param_shardings=reward_param_shardings,
        aux_shardings=aux_shardings,
        base_shardings=base_shardings,
    )
    state = jax.jit(build, out_shardings=shardings)(params, rng, reward_params, aux_tree, base)
    return state, shardings


def policy_params(state: TrainState):
    """The params the model functions take for the policy: `state.params`, or with LoRA the base with
    the adapters attached (`grpo_jax.models.lora.attach`)."""
    return attach(state.base, state.params)


def reference_params(state: TrainState):
    """π_ref's params: `state.ref_params`; with LoRA the base alone (no copy: the adapters off), or the
    base with the reference's own adapters once an iterative-GRPO reset made them differ. None: no
    reference."""
    if state.base is None:
        return state.ref_params
    if state.ref_params is None:
        return state.base.params
    return attach(state.base, state.ref_params)


def reference_copy(params, dtype=None):
    """A frozen copy of `params` for π_ref, cast to `dtype` (a name or dtype; None keeps each leaf's)."""
    if dtype is not None:
        dtype = jnp.dtype(canonical_dtype(dtype, "reference_dtype"))
    return jax.tree_util.tree_map(lambda x: _copy_as(x, x.dtype if dtype is None else dtype), params)


def _copy_as(x, dtype):
    """A new buffer (never an alias of `x`, which may be donated with the policy) in `dtype`."""
    return jnp.copy(x) if x.dtype == dtype else x.astype(dtype)


def reset_reference(state: TrainState) -> TrainState:
    """Iterative GRPO (DeepSeekMath §4.1.4): π_ref ← π_θ, in the reference's own dtype. Same shapes,
    dtypes and shardings: no recompile."""
    if state.ref_params is None:
        return state
    ref = jax.tree_util.tree_map(lambda p, r: _copy_as(p, r.dtype), state.params, state.ref_params)
    return state.replace(ref_params=ref)


STATE_PARTS = ("params", "opt_state", "ref_params", "base", "reward_params", "aux")


def state_bytes(state: TrainState) -> dict[str, int]:
    """Bytes of each part of a train state (`STATE_PARTS`: the trainable params, the optimizer state, the
    reference, a LoRA stage's frozen base, reward models, stage extras such as PPO's critic) and their
    `total`: the arrays' global sizes, whatever their sharding (a replicated array counts once)."""
    sizes = {
        part: sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(getattr(state, part)))
        for part in STATE_PARTS
    }
    return dict(sizes, total=sum(sizes.values()))
