"""Partial rollouts: the rollout engine's state carried from one training step to the next, each step's
decoding capped by a token budget (Kimi k1.5, arXiv 2501.12599 §2.6.2; AReaL's interruptible generation,
arXiv 2505.24298). docs/ARCHITECTURE.md ("Partial rollouts") says what it changes in the update.

`PartialRollouts` holds the compiled programs of one setting; the engine state (`engine.EngineState`,
one sub-engine per data shard stacked on a leading [D] axis) is a plain pytree the caller keeps (the
`grpo` stage keeps it in `TrainState.aux["rollout"]`, so checkpoints hold it). A training step is

    while rollouts.room(state) >= B:                 # free group entries, on every data shard
        state = rollouts.enqueue(state, params, prompts, rng, version)  # prefill B prompts, queue B·G items
    state, out = rollouts.step(state, params, version)  # decode <= budget iterations, hand out B groups

`step` decodes (`engine.advance`) until B groups are complete (every one of their G samples finished;
on a mesh, B/D on every data shard: a shard that is done decodes on while the others finish), the
budget is spent, or no work is left; then it hands out exactly B group places, oldest complete
groups first (enqueue order). A place without a complete group is `fill` (its rows empty, weight 0 in
the update): the static batch shape never mixes a group across steps and never trains an unfinished
sample. Unfinished samples keep their slot, their pages and their last drawn token; the next `step`
feeds it under the params it is given and continues. Each token records the version of the policy
whose forward produced the logits it was drawn from (`Handout.version`): its behaviour policy (token 0:
the version whose prefill enqueued the group).

With an unlimited budget and max_groups = B, a step is exactly a one-shot engine call (same tokens).
Each row's random stream is fixed at enqueue (`fold_in(fold_in(rng, hash(prompt)), j)`, then the row's
own token index), so a sample continued across calls draws the tokens it would have drawn in one call
when the params do not change.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from grpo_jax import sampling
from grpo_jax.models import ModelConfig, activation_sharding
from grpo_jax.rollout import engine
from grpo_jax.sharding import BATCH_AXES, data_parallel_size

PartitionSpec = jax.sharding.PartitionSpec


@flax.struct.dataclass
class Handout:
    """What one `PartialRollouts.step` hands out: B group places, N = B·G rows (row b·G + j is sample j
    of place b; on a mesh, data shard d's places are [d·B/D, (d+1)·B/D)).

    rollout: the groups' `sampling.Rollout` (behaviour logprobs: each token's under the policy that drew
      it); version [N, L] int32: that policy's version; fill [B] bool: no complete group for the place
      (rows empty); payload {name: [B, ...]}: what `enqueue` stored with each group; stats: scalars.
    """

    rollout: sampling.Rollout
    version: jax.Array
    fill: jax.Array
    payload: dict
    stats: dict


def hand_out(geom: engine.Geometry, st: engine.EngineState, target: int):
    """The `target` oldest complete groups of one sub-engine (fewer complete: the rest are fill places)
    -> (state with them released, outputs {name: [target·G, ...]}, payload {name: [target, ...]},
    fill [target] bool)."""
    g, q = geom.group, geom.entries
    complete = engine.complete_groups(st)
    order = jnp.where(complete, st.seq, jnp.iinfo(jnp.int32).max)
    chosen = jnp.argsort(order, stable=True)[:target]  # [target] entries
    ok = complete[chosen]
    rows = (chosen[:, None] * g + jnp.arange(g)).reshape(-1)
    ok_rows = jnp.repeat(ok, g)

    def pick(buf, empty):
        return jnp.where(ok_rows.reshape((-1,) + (1,) * (buf.ndim - 1)), buf[rows], empty)

    outputs = dict(
        tokens=pick(st.tokens, geom.pad_id),
        logprobs=pick(st.logprobs, 0.0),
        sampling_logprobs=pick(st.sampling_logprobs, 0.0),
        mask=pick(st.mask, 0),
        version=pick(st.version, 0),
        lengths=pick(st.lengths, 0),
        truncated=pick(st.truncated, False),
    )
    if geom.observation_len:  # multi-turn: the loss mask and the turns of each row
        outputs.update(loss_mask=pick(st.generated, 0), turns=pick(st.turns, 0))
    payload = {k: v[chosen] for k, v in st.payload.items()}
    released = st.pending.at[jnp.where(ok, chosen, q)].set(False, mode="drop")
    return st.replace(pending=released), outputs, payload, ~ok


class PartialRollouts:
    """The programs of one partial-rollout setting: `init`, `enqueue`, `step`, `room` (module docstring).

    prompts_per_step: B, the groups each step hands out; max_groups: Q, the groups the engine holds at
    once (queued, decoding, complete and waiting), a multiple of B (Q − B groups carry over); num_slots:
    S decode slots (None: one per row of a step's batch, B·G); budget: decode iterations per step (each
    live sample gains one token per iteration); page_size; prompt_len: P; pause_ids, max_turns,
    observation_len: multi-turn rollouts (`grpo_jax.rollout.turns`; `slots` module docstring, "Turns");
    payload_shapes: {name:
    ShapeDtypeStruct of one group's entry} stored with each group and handed out with it; mesh: the
    engine is D sub-engines, one per data shard (D = the mesh's data-parallel size, which must divide B
    and Q); the sampling settings are `sampling.generate`'s.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        *,
        prompts_per_step: int,
        max_groups: int,
        num_slots: int | None,
        budget: int,
        page_size: int,
        prompt_len: int,
        num_samples: int,
        max_new_tokens: int,
        eos_id: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop_ids=(),
        min_new_tokens: int = 0,
        pad_id: int = 0,
        pause_ids=(),
        max_turns: int = 0,
        observation_len: int = 0,
        payload_shapes: dict | None = None,
        mesh=None,
        check_pages: bool = False,
    ):
        settings = sampling.static_settings(
            num_samples=num_samples,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            eos_id=eos_id,
            stop_ids=stop_ids,
            min_new_tokens=min_new_tokens,
            pad_id=pad_id,
        )
        d = 1 if mesh is None else data_parallel_size(mesh)
        if prompts_per_step < 1 or max_groups < prompts_per_step or max_groups % prompts_per_step:
            raise ValueError(
                f"partial rollouts: max_groups={max_groups} must be a multiple of prompts_per_step="
                f"{prompts_per_step} (>= 1)"
            )
        if prompts_per_step % d:
            raise ValueError(
                f"partial rollouts: prompts_per_step={prompts_per_step} must divide over the {d} data shards"
            )
        if budget < 1 or page_size < 1 or (num_slots is not None and num_slots < 1):
            raise ValueError(
                f"partial rollouts: budget={budget}, page_size={page_size} and num_slots={num_slots} "
                "must be >= 1"
            )
        pause_ids = tuple(int(i) for i in pause_ids)
        if pause_ids and observation_len < 1:
            raise ValueError(
                f"multi-turn rollouts: observation_len={observation_len} must be >= 1 with pause_ids"
            )
        if set(pause_ids) & set(settings["stop_ids"]):
            raise ValueError(
                f"multi-turn rollouts: pause_ids {pause_ids} and stop ids {settings['stop_ids']} overlap"
            )
        self.pause_ids, self.max_turns = pause_ids, int(max_turns)
        g = settings["num_samples"]
        entries = max_groups // d
        slots = min(-(-(num_slots or prompts_per_step * g) // d), entries * g)
        self.model_config, self.mesh, self.d = model_config, mesh, d
        self.batch, self.target, self.budget, self.check_pages = (
            prompts_per_step,
            prompts_per_step // d,
            budget,
            check_pages,
        )
        self.stop_ids = settings["stop_ids"]
        self.geom = engine.Geometry(
            entries=entries,
            group=g,
            slots=slots,
            prompt_len=prompt_len,
            length=settings["max_new_tokens"],
            page_size=page_size,
            vocab=model_config.vocab_size,
            pad_id=settings["pad_id"],
            attention=engine.paged_attention_of(model_config),
            observation_len=int(observation_len) if pause_ids else 0,
        )
        self.choose = engine.token_chooser(
            stop_ids=settings["stop_ids"],
            min_new_tokens=settings["min_new_tokens"],
            temperature=settings["temperature"],
            top_k=settings["top_k"],
            top_p=settings["top_p"],
        )
        prompt = jax.ShapeDtypeStruct((prompt_len,), jnp.int32)  # handed out with the group, always
        self.payload_shapes = {"prompt_tokens": prompt, "prompt_mask": prompt, **(payload_shapes or {})}
        self.constrain_slots, self.constrain_pages = engine._constraints(mesh, sharded=True)
        shapes = jax.eval_shape(self._init_body)
        self.shardings = self._state_shardings(shapes)
        self._init = jax.jit(self._init_body, out_shardings=self.shardings)
        self._enqueue = jax.jit(self._enqueue_body, out_shardings=self.shardings, donate_argnums=(0,))
        self._step = jax.jit(self._step_body, out_shardings=(self.shardings, None), donate_argnums=(0,))
        self._decode = jax.jit(self._decode_body, out_shardings=(self.shardings, None), donate_argnums=(0,))
        self._hand_out = jax.jit(
            self._hand_out_body, out_shardings=(self.shardings, None), donate_argnums=(0,)
        )
        self._resume = jax.jit(
            lambda st, obs, n, end: self._vmap(lambda *a: engine.resume(self.geom, *a))(st, obs, n, end),
            out_shardings=self.shardings,
            donate_argnums=(0,),
        )
        self._room = jax.jit(
            lambda st: self.d * jnp.min(self.geom.entries - jnp.sum(st.pending, axis=-1, dtype=jnp.int32))
        )

    # -- the public programs ------------------------------------------------------------------------

    def init(self) -> engine.EngineState:
        """An empty engine: no group, every page free (placed in `shardings`)."""
        return self._init()

    def room(self, st: engine.EngineState) -> int:
        """Groups the engine can take now, the same number on every data shard (host int)."""
        return int(self._room(st))

    def enqueue(self, st, params, prompts: dict, rng, version) -> engine.EngineState:
        """Prefill B prompts under `params` (policy `version`) into free entries, their B·G samples queued.
        prompts: {"prompt_tokens", "prompt_mask" [B, P], and every payload name [B, ...]} in the batch
        layout; rng: the new rows' streams are `sampling.sample_keys(rng, ...)`. Donates `st`."""
        payload = {k: prompts[k] for k in self.payload_shapes}
        return self._enqueue(
            st, params, prompts["prompt_tokens"], prompts["prompt_mask"], payload, rng, jnp.int32(version)
        )

    def step(self, st, params, version) -> tuple[engine.EngineState, Handout]:
        """Decode at most `budget` iterations under `params` (policy `version`) and hand out B group places
        (module docstring). Donates `st`."""
        return self._step(st, params, jnp.asarray(version, jnp.int32))

    def decode(self, st, params, version, budget) -> tuple[engine.EngineState, jax.Array]:
        """`step`'s decoding alone, at most `budget` iterations (multi-turn rollouts: it also ends when
        every row with a slot waits for an observation) -> (state, iterations run). Donates `st`."""
        return self._decode(st, params, jnp.asarray(version, jnp.int32), jnp.asarray(budget, jnp.int32))

    def hand_out(self, st, iterations=0) -> tuple[engine.EngineState, Handout]:
        """`step`'s hand-out alone: B group places from the complete groups; `iterations`: the decode
        iterations of the step, for its stats. Donates `st`."""
        return self._hand_out(st, jnp.asarray(iterations, jnp.int32))

    def resume(self, st, observations, lengths, end=None) -> engine.EngineState:
        """`engine.resume` on every data shard: observations [D, S, O] int32, lengths [D, S], end [D, S]
        bool (None: none ends) for the slots `st.paused` marks. Donates `st`."""
        lengths = jnp.asarray(lengths, jnp.int32)
        end = jnp.zeros(lengths.shape, bool) if end is None else jnp.asarray(end, bool)
        return self._resume(st, jnp.asarray(observations, jnp.int32), lengths, end)

    # -- traced bodies ------------------------------------------------------------------------------

    def _vmap(self, fn, in_axes=0):
        """Over the leading shard axis (placed over the batch axes on a mesh)."""
        if self.mesh is None:
            return jax.vmap(fn, in_axes=in_axes)
        return jax.vmap(fn, in_axes=in_axes, spmd_axis_name=BATCH_AXES)

    def _init_body(self):
        one = lambda _: engine.init_state(self.geom, self.model_config, self.payload_shapes)  # noqa: E731
        with activation_sharding(None):
            return self._vmap(one)(jnp.arange(self.d))

    def _split(self, x):
        return x.reshape(self.d, x.shape[0] // self.d, *x.shape[1:])

    def _enqueue_body(self, st, params, prompt_tokens, prompt_mask, payload, rng, version):
        g = self.geom.group
        row_keys = sampling.sample_keys(rng, prompt_tokens, prompt_mask, g)  # [B·G]
        valid = jnp.ones((self.d, self.target), bool)
        with activation_sharding(self.mesh):  # the prefill of all B prompts, on the mesh's layout
            prompt_logits, cache = engine.prefill(self.model_config, params, prompt_tokens, prompt_mask)

        def one(st, mask, logits, cache, keys, valid, payload):
            return engine.enqueue(
                self.geom,
                self.model_config,
                st,
                mask,
                logits,
                cache,
                keys,
                valid,
                version,
                choose=self.choose,
                stop_ids=self.stop_ids,
                pause_ids=self.pause_ids,
                max_turns=self.max_turns,
                payload=payload,
                constrain_pages=self.constrain_pages,
            )

        split = self._split
        cache = jax.tree_util.tree_map(lambda c: c.reshape(c.shape[0], self.d, -1, *c.shape[2:]), cache)
        with activation_sharding(None):
            return self._vmap(one, in_axes=(0, 0, 0, 1, 0, 0, 0))(
                st,
                split(prompt_mask),
                split(prompt_logits),
                cache,  # [layers, D, B/D, P, K, Dh]
                split(row_keys),
                valid,
                jax.tree_util.tree_map(split, payload),
            )

    def _step_body(self, st, params, version):
        return self._hand_out_body(*self._decode_body(st, params, version, self.budget))

    def _decode_body(self, st, params, version, budget):
        with activation_sharding(self.mesh):
            loop_params = engine.decode_params(self.model_config, params, self.mesh)
        with activation_sharding(None):
            before = st.iterations
            st = engine.advance(
                self.geom,
                self.model_config,
                loop_params,
                st,
                budget=budget,
                target=self.target,
                version=version,
                choose=self.choose,
                stop_ids=self.stop_ids,
                pause_ids=self.pause_ids,
                max_turns=self.max_turns,
                check_pages=self.check_pages,
                kernel_mesh=self.mesh,
                constrain_slots=self.constrain_slots,
                constrain_pages=self.constrain_pages,
                vmap=self._vmap,
            )
        return st, jnp.max(st.iterations - before)

    def _hand_out_body(self, st, iterations):
        geom, nq = self.geom, self.geom.items
        with activation_sharding(None):
            st, outputs, payload, fill = self._vmap(lambda st: hand_out(geom, st, self.target))(st)
        rows = lambda x: sampling._constrain_rows(x.reshape(-1, *x.shape[2:]), self.mesh, 0)  # noqa: E731
        outputs = {k: rows(v) for k, v in outputs.items()}
        payload = {k: rows(v) for k, v in payload.items()}
        fill = rows(fill)
        g = geom.group
        repeat = lambda x: jnp.repeat(x, g, axis=0)  # noqa: E731
        rollout = sampling.Rollout(
            tokens=outputs["tokens"],
            logprobs=outputs["logprobs"],
            sampling_logprobs=outputs["sampling_logprobs"],
            mask=outputs["mask"],
            lengths=outputs["lengths"],
            truncated=outputs["truncated"],
            prompt_tokens=repeat(payload["prompt_tokens"]),
            prompt_mask=repeat(payload["prompt_mask"]),
            num_steps=jnp.max(outputs["lengths"]),
            loss_mask=outputs.get("loss_mask"),
        )
        total = lambda x: jnp.sum(x, dtype=jnp.int32)  # noqa: E731
        stats = {
            "decode_iterations": iterations,
            "complete_groups": total(~fill),
            "fill_groups": total(fill),
            "inflight_groups": total(st.pending),
            "queued_samples": total(st.queue_len),
            "live_samples": total(st.item < nq),
            "pages_in_use": total(geom.num_pages - st.pool.free_count),
            "page_errors": total(st.page_errors),
            "pool_underflows": total(st.underflows),
            "dropped_prompts": total(st.dropped),
        }
        if "turns" in outputs:
            stats["turns"] = outputs["turns"]  # [N] pauses per handed-out row
        return st, Handout(
            rollout=rollout, version=outputs["version"], fill=fill, payload=payload, stats=stats
        )

    def _state_shardings(self, shapes):
        """Every leaf's leading shard axis over the batch axes; the pages' KV heads over `tensor` too."""
        mesh = self.mesh
        if mesh is None:
            return None
        tensor = mesh.shape["tensor"]

        def spec(path, leaf):
            names = [getattr(k, "name", getattr(k, "key", None)) for k in path]
            rest = [None] * (leaf.ndim - 1)
            if names[0] == "pages" and leaf.shape[1] % tensor == 0:  # [D, K, layers * pages, page, Dh]
                rest[0] = "tensor"
            return jax.sharding.NamedSharding(mesh, PartitionSpec(BATCH_AXES, *rest))

        return jax.tree_util.tree_map_with_path(spec, shapes)


def stage_payload_shapes(prompt_len: int, answer_len: int) -> dict:
    """What the RL stages store with each group: the prompt batch's per-prompt keys, one prompt's shapes
    (`grpo_jax.data.pipeline.make_prompt_dataset`'s batch keys besides `prompt_truncated`)."""
    return {
        "prompt_tokens": jax.ShapeDtypeStruct((prompt_len,), jnp.int32),
        "prompt_mask": jax.ShapeDtypeStruct((prompt_len,), jnp.int32),
        "answer_tokens": jax.ShapeDtypeStruct((answer_len,), jnp.int32),
        "answer_mask": jax.ShapeDtypeStruct((answer_len,), jnp.int32),
        "route": jax.ShapeDtypeStruct((), jnp.int32),
        "example_index": jax.ShapeDtypeStruct((), jnp.int32),
    }
