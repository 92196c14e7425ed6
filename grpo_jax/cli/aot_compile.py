"""Compile a config's sampler and GRPO step for a TPU topology, ahead of time, on any machine.

    python scripts/aot_compile.py --config=configs/NAME.py --topology=v5e:4x4 [--config.a.b=value ...]
        [--model_preset=qwen2.5-7b] [--activation_sharding=batch] [--programs=sampler,grpo_step]
        [--out=FILE.json] [--config.sampler_mesh="(replica,tensor)" --sampler_topology=v5e:8x8]

Nothing runs and no weights are read: parameters, optimizer state and batches are
`jax.ShapeDtypeStruct`s carrying the shardings the trainer would give them on the config's mesh
(`config.mesh` and `config.dcn_mesh`, built by `grpo_jax.training.setup.build_mesh` over the topology's
devices). The programs are the ones `scripts/train.py` compiles for the config's GRPO stage:

- `sampler`: `grpo_jax.sampling.generate` for `prompts_per_step` prompts × `num_generations` samples of
  `max_new_tokens` tokens after `max_prompt_len`-token prompts (the rollout of one RL step);
- `grpo_step`: the one-program GRPO update (`grpo_jax.training.make_grpo_step`) on that rollout, with the
  stage's optimizer, reference (when `kl_coef > 0`), minibatches, μ, remat and logprob chunking.
  In-graph rule rewards are not compiled (they need the tokenizer; their cost is a few element-wise ops
  over [N, L] tokens); the rewards enter as the `host_rewards` array instead. A reward model
  (`reward_model_from`) is not included either.

With `config.sampler_mesh` (asynchronous GRPO: the sampler on its own chips, docs/ARCHITECTURE.md) and
`--sampler_topology`, the sampler's programs compile on the sampler's (replica, 1, tensor) mesh over that
topology, on weights in the compute dtype (what the weight sync lands there), the step on `--topology`
with `config.mesh`, and the report gains `sampler_mesh`, each program's `mesh` and `weight_sync` (bytes
per chip, from the shardings). Each side is its own slice: libtpu compiles a program only over a whole
topology's device ids, so half of one topology is not expressible.

Needs libtpu (`pip install -e ".[tpu]"`): the TPU compiler runs on the CPU against compile-only
devices from `jax.experimental.topologies.get_topology_desc`. Topology names are
`<chip>:<dims>`: `v5e:2x2`, `v5e:4x4`, `v5e:8x8`, `v5e:16x16`, `v5p:4x4x4`, `v4:2x2x1`, `v6e:4x4`.

For each program it prints the per-device memory of `compiled.memory_analysis()` against the chip's
HBM and the FLOPs of `compiled.cost_analysis()` (which counts a loop body once, so it undercounts the
scanned layer stack and the decode loop; an analytic count is printed beside it). A program that does
not fit makes the TPU compiler fail with RESOURCE_EXHAUSTED: it is reported with `fits: false` and the
memory the compiler said it needed. The last line of stdout is one JSON object:

    {"topology": ..., "mesh": {...}, ..., "programs": {"sampler": {"fits": bool,
     "peak_bytes_per_device": int, ...}, "grpo_step": {...}}}

Exit status 0 whether or not the programs fit; 1 with one line on stderr for a bad flag, config or
topology (and a traceback for a compile error that is not an out-of-memory).

Results for Qwen2.5 0.5B-32B on v5e/v5p slices: benchmarks/tpu_aot.md; what they mean: docs/SCALING.md.
"""

from __future__ import annotations

import os

# The programs compile for compile-only TPU devices; the process itself needs only the CPU backend
# (and without this, an installed libtpu would first try and fail to open a local TPU).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu takes /tmp/libtpu_lockfile for the life of any process that opened a local TPU (or tried to:
# a JAX process without JAX_PLATFORMS on a machine with libtpu installed); compiling needs no TPU.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:4x4, v5e:16x16, v5p:4x4x4.")
_STAGE = flags.DEFINE_string("stage", "", "The GRPO stage to compile (default: the config's first one).")
_PROGRAMS = flags.DEFINE_list(
    "programs",
    ["sampler", "grpo_step"],
    "Programs to compile: sampler, grpo_step, engine (the rollout engine, config.engine's slots and pages), "
    "engine_step (one of its decode steps alone: XLA's bytes accessed per step).",
)
_ENGINE_DECODE_LAYOUT = flags.DEFINE_bool(
    "engine_decode_layout",
    True,
    "engine, engine_step: decode with the weights in the decode layout (cast and placed over tensor once "
    "per rollout, per-layer leaves); false: the params as the trainer holds them, cast and gathered per "
    "layer at every step (the layout before it).",
)
_MODEL_PRESET = flags.DEFINE_string(
    "model_preset",
    "",
    "Use a known architecture's shapes instead of config.model (dtypes, remat and the attention backend come "
    "from config.model): " + ", ".join(["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "..."]),
)
_ACTIVATION_SHARDING = flags.DEFINE_enum(
    "activation_sharding",
    "none",
    ["none", "batch"],
    "none: compile the model code as it is. batch: pin the token embeddings [B, T, D] to the batch axes "
    "(data, fsdp), a stand-in for a hook the model code does not have yet (docs/SCALING.md): without it "
    "XLA shards the residual stream like the embedding table (on its hidden dimension over fsdp) and "
    "replicates the batch on every fsdp device.",
)
_SAMPLER_TOPOLOGY = flags.DEFINE_string(
    "sampler_topology",
    "",
    "With --config.sampler_mesh=(replica,tensor): the TPU topology of the sampler's own slice (its mesh "
    "takes all of its chips); the step compiles on --topology with config.mesh. A split of ONE topology's "
    "chips is not expressible here: libtpu compiles a program only over a whole topology's device ids.",
)
_HBM_GIB = flags.DEFINE_float("hbm_gib", 0.0, "HBM per device in GiB (default: from the chip kind).")
_OUT = flags.DEFINE_string("out", "", "Also write the final JSON object to this file.")
flags.mark_flags_as_required(["config", "topology"])

GIB = 2**30
PROGRAM_NAMES = ("sampler", "grpo_step", "engine", "engine_step")


class AotError(Exception):
    """A problem with the flags, the config or the topology: reported in one line."""


def _fail(message: str) -> None:
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    sys.exit(1)


# ------------------------------------------------------------------------------------------------
# What to compile
# ------------------------------------------------------------------------------------------------


def grpo_stage_name(config, requested: str = "") -> str:
    stages = list(config.stages)
    if requested:
        if requested not in stages or not requested.startswith("grpo"):
            raise AotError(f"--stage={requested!r} is not a GRPO stage of {stages}")
        return requested
    for name in stages:
        if name.startswith("grpo"):
            return name
    raise AotError(f"the config has no GRPO stage (stages: {stages})")


def model_config_for(config, preset: str = ""):
    """The ModelConfig to compile: a preset's shapes, an HF directory's config.json (no weights are read),
    or `config.model`'s fields (vocabulary: `model.vocab_size`, else `tokenizer.vocab_size`)."""
    from grpo_jax.models import ModelConfig
    from grpo_jax.models.presets import MODEL_PRESETS
    from grpo_jax.training.setup import runtime_fields

    m = config.model
    dtypes = runtime_fields(m)
    if preset:
        if preset not in MODEL_PRESETS:
            raise AotError(f"--model_preset={preset!r}; known: {sorted(MODEL_PRESETS)}")
        return ModelConfig(**MODEL_PRESETS[preset], **dtypes)
    if m.pretrained:
        from grpo_jax.models.hf import config_from_hf

        path = os.path.join(m.pretrained, "config.json")
        if not os.path.exists(path):
            raise AotError(f"config.model.pretrained: no config.json in {m.pretrained}")
        with open(path) as f:
            return config_from_hf(json.load(f), where=path, **dtypes)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    fields = {k: v for k, v in m.to_dict().items() if k in known}
    fields["vocab_size"] = fields.get("vocab_size") or config.tokenizer.get("vocab_size", 0)
    if not fields["vocab_size"] or not fields.get("hidden_size"):
        raise AotError(
            "config.model has no shapes (it is read from a pretrained directory): pass --model_preset=NAME "
            "or --config.model.pretrained=DIR (only its config.json is read)"
        )
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as error:
        raise AotError(str(error)) from error


def topology_devices(name: str):
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except RuntimeError as error:  # JaxRuntimeError (bad name) and "JAX TPU support not installed"
        text = str(error).strip().splitlines()[0]
        if "not installed" in text:
            text += ' (install libtpu: pip install -e ".[tpu]")'
        raise AotError(f"--topology={name}: {text}") from error


def config_without_sampler_mesh(config):
    """A copy of `config` whose `sampler_mesh` is None (the trainer's mesh then takes every device)."""
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.sampler_mesh = None
    return c


@contextlib.contextmanager
def batch_sharded_embeddings(mesh):
    """Within the block, `grpo_jax.models.transformer.embed_tokens` returns its [B, T, D] output
    constrained to P(("data", "fsdp"), None, None) (when B divides), in the training forward and in the
    sampler's prefill and decode steps alike."""
    import jax

    from grpo_jax import sharding
    from grpo_jax.models import transformer

    original = transformer.embed_tokens
    dp = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)

    def embed_tokens(config, params, tokens):
        x = original(config, params, tokens)
        if x.shape[0] % dp:
            return x
        return jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh, x.ndim))

    transformer.embed_tokens = embed_tokens
    try:
        yield
    finally:
        transformer.embed_tokens = original


def _sds(tree, shardings):
    import jax

    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _per_device_bytes(tree) -> int:
    import jax
    import numpy as np

    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        itemsize = 8 if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else np.dtype(x.dtype).itemsize
        total += math.prod(shard) * itemsize
    return total


@dataclasses.dataclass
class Programs:
    """Abstract inputs and the jitted functions for one config on one mesh."""

    mesh: object
    model_config: object
    grpo: object
    prompts: int
    prompt_len: int
    new_tokens: int
    sampler: object
    sampler_args: tuple
    step: object
    step_args: tuple
    lora: object = None  # the stage's LoRAConfig (None: it trains every weight)
    engine: object = None  # the rollout engine (rollout.generate_with_stats) with the sampler's arguments
    engine_step: object = None  # one decode step of the engine alone, and its abstract inputs
    engine_step_args: tuple = ()
    engine_info: dict = dataclasses.field(default_factory=dict)


def build_programs(
    config,
    stage: str,
    model_config,
    mesh,
    *,
    engine_decode_layout: bool = True,
    with_engine: bool = True,
    sampler_dtype=None,
) -> Programs:
    """The sampler and the GRPO step as `scripts/train.py` builds them for `stage`, with abstract inputs.
    `sampler_dtype`: the sampler's params arrive in that dtype (a `config.sampler_mesh` run: the weight
    sync casts them to the compute dtype before they land on the sampler's mesh); None: as the trainer
    holds them (co-located)."""
    import jax
    import jax.numpy as jnp

    from grpo_jax import models, sampling, sharding
    from grpo_jax.models import lora as lora_lib
    from grpo_jax.training import (
        learning_rate_schedule,
        make_grpo_step,
        make_optimizer,
        rollout_to_batch,
        state_shardings,
    )
    from grpo_jax.training import setup as run_setup
    from grpo_jax.training.state import train_state_builder

    sc = config[stage]
    try:
        grpo = run_setup.grpo_config(sc)
    except (TypeError, ValueError, KeyError) as error:
        raise AotError(f"config.{stage}.algo: {error}") from error
    G, B = grpo.num_generations, int(sc.prompts_per_step)
    P, L, A = int(config.max_prompt_len), int(config.max_new_tokens), int(config.max_answer_len)
    dp = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    if B % dp:
        raise AotError(
            f"config.{stage}.prompts_per_step={B} is not divisible by the data-parallel size {dp} "
            f"(mesh {dict(mesh.shape)}): the trainer could not place the prompt batch either"
        )
    replicated = sharding.replicated(mesh)
    rows = lambda shape, dtype: jax.ShapeDtypeStruct(
        shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape))
    )

    param_shardings = models.model_param_shardings(mesh, model_config)
    params = _sds(
        jax.eval_shape(lambda k: models.init_params(model_config, k), jax.random.key(0)), param_shardings
    )
    key_shape = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(key_shape.shape, key_shape.dtype, sharding=replicated)

    # The sampler, exactly as RolloutStage.rollout calls it (placed prompt batch, key from the state).
    prompt_batch = {
        "prompt_tokens": rows((B, P), jnp.int32),
        "prompt_mask": rows((B, P), jnp.int32),
        "answer_tokens": rows((B, A), jnp.int32),
        "answer_mask": rows((B, A), jnp.int32),
        "route": rows((B,), jnp.int32),
    }
    sample = functools.partial(
        sampling.generate,
        model_config,
        num_samples=G,
        max_new_tokens=L,
        temperature=grpo.temperature,
        top_p=float(sc.get("top_p", 1.0)),
        top_k=int(sc.get("top_k", 0)),
        eos_id=1,
        pad_id=0,
        mesh=mesh,
    )
    sampler = jax.jit(sample)
    # LoRA (config.<stage>.lora): the state trains adapters over the frozen base in `base_dtype`; the
    # sampler decodes with the weights merged in the compute dtype, or with the base + adapters.
    lora = run_setup.stage_lora(config, stage)
    base = adapters = adapter_shardings = None
    if lora is not None:
        adapter_shardings = lora_lib.adapter_shardings(mesh, model_config, lora)
        adapters = _sds(
            jax.eval_shape(lambda k: lora_lib.init_adapters(model_config, lora, k), jax.random.key(0)),
            adapter_shardings,
        )
        base_dtype = lora.base_dtype or None
        base = lora_lib.FrozenBase(
            jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(x.shape, base_dtype or x.dtype, sharding=x.sharding), params
            ),
            lora.scale,
        )
        if lora.sampler_weights == "adapters":  # the base's tree with the adapters under layers/lora
            attached = jax.eval_shape(lora_lib.attach, base, adapters)
            layers = dict(param_shardings["layers"], **adapter_shardings["layers"])
            sampler_params = _sds(attached, dict(param_shardings, layers=layers))
        else:
            compute = model_config.compute_dtype
            merged = jax.eval_shape(
                lambda b, a: lora_lib.merge(lora_lib.attach(b, a), compute), base, adapters
            )
            sampler_params = _sds(merged, param_shardings)
    sampler_args = (
        params if lora is None else sampler_params,
        prompt_batch["prompt_tokens"],
        prompt_batch["prompt_mask"],
        rng,
    )
    if sampler_dtype is not None:
        floating = lambda x: jnp.issubdtype(x.dtype, jnp.floating)
        cast = lambda x: jax.ShapeDtypeStruct(
            x.shape, sampler_dtype if floating(x) else x.dtype, sharding=x.sharding
        )
        sampler_args = (jax.tree_util.tree_map(cast, sampler_args[0]), *sampler_args[1:])

    # The step: the stage's optimizer and state layout (create_train_state), the batch rollout_to_batch
    # makes from the sampler's output, plus the host rewards and the debug switch the stage always adds.
    updates = grpo.num_iterations * grpo.num_minibatches
    opt_config = run_setup.optimizer_config(sc, int(sc.steps) * updates)
    optimizer = make_optimizer(opt_config)

    # As the stage builds it (create_train_state); with LoRA the reference is the base itself, unless
    # an iterative-GRPO reset needs reference adapters of its own.
    with_reference = grpo.kl_coef > 0 and (lora is None or grpo.reference_reset_every > 0)
    build = train_state_builder(
        optimizer,
        with_reference=with_reference,
        reference_dtype=sc.get("reference_dtype") or None,
        base_dtype=lora.base_dtype if lora is not None else "",
    )
    trained = params if lora is None else adapters
    state_shapes = jax.eval_shape(build, trained, rng, {}, {}, base)
    shardings = state_shardings(
        state_shapes,
        param_shardings if lora is None else adapter_shardings,
        optimizer,
        mesh,
        base_shardings=None if lora is None else lora_lib.FrozenBase(param_shardings, lora.scale),
    )
    state = _sds(state_shapes, shardings)
    rollout = jax.eval_shape(sample, *sampler_args)
    batch_shapes = jax.eval_shape(
        lambda r, pb, hr: rollout_to_batch(r, pb, G, hr),
        rollout,
        prompt_batch,
        jax.ShapeDtypeStruct((B * G,), jnp.float32),
    )
    batch = {k: rows(v.shape, v.dtype) for k, v in batch_shapes.items()}
    if grpo.advantage_estimator == "process":
        S = int(sc.get("max_steps", 8))
        batch.update(
            step_rewards=rows((B * G, S), jnp.float32),
            step_mask=rows((B * G, S), jnp.int32),
            step_end_index=rows((B * G, S), jnp.int32),
        )
    batch["poison"] = jax.ShapeDtypeStruct((), jnp.bool_, sharding=replicated)
    step = make_grpo_step(
        grpo,
        model_config,
        optimizer,
        reward_fn=None,
        mesh=mesh,
        state_shardings=shardings,
        lr_schedule=learning_rate_schedule(opt_config),
        logprob_chunk_size=int(config.logprob_chunk_size),
        grad_accum_steps=int(sc.get("grad_accum_steps", 1)),
        shared_prefix=bool(sc.get("shared_prefix", False)),
    )
    programs = Programs(mesh, model_config, grpo, B, P, L, sampler, sampler_args, step, (state, batch), lora)
    add_engine_programs(
        programs, config, sample.keywords, sampler_args[0], decode_layout=engine_decode_layout
    )
    return programs


def add_engine_programs(p: Programs, config, sample_kwargs: dict, params, *, decode_layout: bool) -> None:
    """The rollout engine as `config.sampler = "engine"` runs it (`config.engine`: num_slots, 0 = one per
    row; page_size), and one of its decode steps alone with the inputs the loop gives it: the weights in
    the decode layout (or as held, `decode_layout=False`), the shards' slots and page pools (one per data
    shard, vmapped over the batch axes as in the engine)."""
    import jax
    import jax.numpy as jnp

    from grpo_jax import rollout, sharding
    from grpo_jax.models import activation_sharding
    from grpo_jax.rollout import engine as engine_lib
    from grpo_jax.rollout import paged_cache

    section = config.get("engine") or {}
    num_slots, page_size = int(section.get("num_slots", 0)), int(section.get("page_size", 16))
    mesh, model = p.mesh, p.model_config
    engine_kwargs = {k: v for k, v in sample_kwargs.items()}
    p.engine = jax.jit(
        functools.partial(
            rollout.generate_with_stats,
            model,
            **engine_kwargs,
            num_slots=num_slots or None,
            page_size=page_size,
            decode_layout=decode_layout,
        )
    )
    n = p.prompts * p.grpo.num_generations
    d = engine_lib._shards(mesh, p.prompts)
    slots = min(-(-(num_slots or n) // d), n // d)
    attention = "pallas" if model.attention_impl == "splash" else "xla"
    geometry = engine_lib.pool_geometry(
        p.prompts // d, p.prompt_len, p.new_tokens, page_size=page_size, slots=slots, attention=attention
    )
    p.engine_info = dict(
        shards=d, slots_per_shard=slots, page_size=page_size, attention=attention, decode_layout=decode_layout
    )
    p.engine_info.update(geometry)
    step_model = model if decode_layout else model.replace(scan_layers=False)  # count every layer's work
    if decode_layout:
        specs = engine_lib.decode_specs(model, mesh)
        shapes = jax.eval_shape(lambda w: engine_lib.decode_params(model, w), params)

        def placed(path, x):  # the decode layout's spec; LoRA adapters (cast, not placed): replicated
            spec = specs
            for key in path:
                key = getattr(key, "key", getattr(key, "idx", None))
                spec = spec.get(key) if isinstance(spec, dict) else spec[key] if spec is not None else None
            spec = spec if isinstance(spec, jax.sharding.PartitionSpec) else jax.sharding.PartitionSpec()
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.NamedSharding(mesh, spec))

        loop_params = jax.tree_util.tree_map_with_path(placed, shapes)
    else:
        loop_params = params
    batch_axes = sharding.BATCH_AXES if d > 1 else None
    lead = (d,) if d > 1 else ()
    tensor = mesh.shape["tensor"]
    heads = "tensor" if model.num_kv_heads % tensor == 0 else None

    def arg(shape, dtype, *rest):
        spec = jax.sharding.PartitionSpec(*((batch_axes,) if d > 1 else ()), *rest)
        return jax.ShapeDtypeStruct((*lead, *shape), dtype, sharding=jax.sharding.NamedSharding(mesh, spec))

    total_pages = model.num_layers * (geometry["num_pages"] + 1)
    page_shape = (model.num_kv_heads, total_pages, page_size, model.resolved_head_dim)
    page = arg(page_shape, model.compute_dtype, heads)
    per_slot = arg((slots,), jnp.int32)
    p.engine_step_args = (
        loop_params,
        per_slot,  # tokens
        per_slot,  # positions
        {"k": page, "v": page},
        arg((slots, geometry["max_pages"]), jnp.int32),  # page table
        per_slot,  # lengths
        per_slot,  # write page
        per_slot,  # write offset
    )

    def step(loop_params, *inputs):
        run = functools.partial(
            paged_cache.decode_step,
            step_model,
            loop_params,
            num_pages=geometry["num_pages"],
            impl=attention,
            mesh=mesh,
        )
        if d == 1:
            with activation_sharding(mesh):
                return run(*inputs)
        return jax.vmap(run, spmd_axis_name=sharding.BATCH_AXES)(*inputs)

    p.engine_step = jax.jit(step, donate_argnums=(3,))


# ------------------------------------------------------------------------------------------------
# Compile and report
# ------------------------------------------------------------------------------------------------

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def weight_sync_bytes(model_config, trainer_mesh, sampler_mesh) -> dict:
    """What the weight sync (`rollout.weight_sync`) moves per policy version, per chip, from the
    shardings (nothing to compile: the cast is elementwise and the copies are transfers): the weights in
    the compute dtype, the trainer chip's own cast shard, the slice each sampler chip receives, and, on
    several hosts, the mirror on the trainer chips (`mirror_mesh`: each trainer chip paired with a sampler
    chip of its host gathers that chip's slice from its fsdp peers, then copies it across)."""
    import jax
    import jax.numpy as jnp

    from grpo_jax import models

    dtype = jnp.dtype(model_config.compute_dtype)
    shapes = jax.eval_shape(lambda k: models.init_params(model_config, k), jax.random.key(0))
    cast = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype),
        shapes,
    )
    total = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cast))
    own = _per_device_bytes(_sds(cast, models.model_param_shardings(trainer_mesh, model_config)))
    received = _per_device_bytes(_sds(cast, models.model_param_shardings(sampler_mesh, model_config)))
    trainer_chips, sampler_chips = trainer_mesh.devices.size, sampler_mesh.devices.size
    out = {
        "dtype": str(dtype),
        "total_bytes": int(total),
        "cast_shard_bytes_per_trainer_chip": own,
        "received_bytes_per_sampler_chip": received,
    }
    if trainer_chips % sampler_chips == 0:  # every host splits its chips in this ratio (split_devices)
        out.update(
            mirror_copies=trainer_chips // sampler_chips,
            mirror_bytes_per_trainer_chip=received,  # held while it moves: one sampler chip's slice
            mirror_gathered_bytes_per_trainer_chip=max(received - own, 0),  # at least, over the trainer's ICI
            copied_bytes_per_chip_pair=received,  # trainer chip -> its paired sampler chip
        )
    return out


def bytes_from_oom(message: str) -> int | None:
    """The memory the TPU compiler said a program needs, from its RESOURCE_EXHAUSTED message, e.g.
    'the total memory required for HLO temporaries (20.00G) exceeds available HBM (15.75G)' or
    'Used 20.5G of 15.48G hbm'."""
    for pattern in (r"required[^(]*\(([\d.]+)\s*([KMGT]?)i?B?\)", r"Used\s+([\d.]+)\s*([KMGT]?)i?B?\s+of"):
        match = re.search(pattern, message)
        if match:
            return int(float(match.group(1)) * _UNITS[match.group(2)])
    return None


def compile_program(fn, args, hbm_bytes: int) -> dict:
    """Lower and compile `fn(*args)`; memory, FLOPs and whether it fits in `hbm_bytes` per device."""
    import jax

    result: dict = {"unpadded_input_bytes_per_device": _per_device_bytes(args)}
    t0 = time.time()
    lowered = fn.lower(*args)
    result["lower_s"] = round(time.time() - t0, 2)
    t0 = time.time()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        text = str(error)
        if "RESOURCE_EXHAUSTED" not in text:
            raise
        needed = bytes_from_oom(text)
        result.update(
            compile_s=round(time.time() - t0, 2),
            fits=False,
            peak_bytes_per_device=needed,
            peak_source="compiler out-of-memory message",
            oom=" ".join(text.split())[:400],
        )
        return result
    result["compile_s"] = round(time.time() - t0, 2)
    hlo = compiled.as_text() or ""
    mem = compiled.memory_analysis()
    fields = ("argument", "output", "alias", "temp", "generated_code")
    stats = {f"{f}_bytes": int(getattr(mem, f"{f}_size_in_bytes", 0) or 0) for f in fields}
    # XLA's heap-simulated peak can be below its temp allocation; the larger of the two is what HBM must
    # hold (arguments + non-aliased outputs + the temp buffer).
    stats["peak_memory_bytes"] = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
    total = stats["argument_bytes"] + stats["output_bytes"] - stats["alias_bytes"] + stats["temp_bytes"]
    peak = max(total, stats["peak_memory_bytes"])
    source = "max(argument + output - alias + temp, peak_memory_in_bytes)"
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    result.update(
        fits=bool(peak <= hbm_bytes),
        peak_bytes_per_device=peak,
        peak_source=source,
        memory=stats,
        xla_flops=float((cost or {}).get("flops", 0.0)),
        xla_bytes_accessed=float((cost or {}).get("bytes accessed", 0.0)),
        # the kernels in the program (e.g. tpu_custom_call: a Pallas kernel compiled by Mosaic)
        custom_calls=sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo))),
        collectives=collective_bytes(hlo),
    )
    return result


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4, "u32": 4}


def collective_bytes(hlo: str) -> dict:
    """Per device, the collectives of a compiled program (`compiled.as_text()`): for each kind (all-reduce,
    all-gather, reduce-scatter, all-to-all, collective-permute) how many there are and the bytes of their
    results, summed over the program text (a loop body counted once, as XLA's cost analysis does). XLA's
    "bytes accessed" leaves the interconnect out; this is its share."""
    kinds = "all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute"
    pattern = rf"= \(?((?:\w+\[[\d,]*\](?:\{{[^}}]*\}})?(?:, )?)+)\)? ({kinds})(?:-start)?\("
    out: dict = {}
    for match in re.finditer(pattern, hlo):
        size = 0
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)):
            size += math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dtype, 4)
        entry = out.setdefault(match.group(2), {"count": 0, "result_bytes": 0})
        entry["count"] += 1
        entry["result_bytes"] += size
    return out


def _gib(n) -> str:
    return "?" if n is None else f"{n / GIB:.2f} GiB"


def run(
    config,
    topology: str,
    *,
    stage: str = "",
    preset: str = "",
    programs=("sampler", "grpo_step"),
    hbm_gib: float = 0.0,
    activation_sharding: str = "none",
    engine_decode_layout: bool = True,
    sampler_topology: str = "",
) -> dict:
    """Resolve the config, model, topology and mesh, compile `programs`, print and return the report.
    With `config.sampler_mesh` and `sampler_topology`: the sampler's programs (sampler, engine,
    engine_step) on the sampler's mesh over that topology, on weights in the compute dtype, the step on
    `topology`, and the weight sync's bytes per chip (`weight_sync_bytes`)."""
    from grpo_jax.flops import TPU_CHIPS
    from grpo_jax.training import setup

    unknown = sorted(set(programs) - set(PROGRAM_NAMES))
    if unknown:
        raise AotError(f"--programs: unknown {unknown}; known: {', '.join(PROGRAM_NAMES)}")
    stage = grpo_stage_name(config, stage)
    model_config = model_config_for(config, preset)
    devices = topology_devices(topology)
    kind = devices[0].device_kind
    chip = TPU_CHIPS.get(kind, {})
    hbm = hbm_gib or chip.get("hbm_gib")
    if not hbm:
        raise AotError(f"unknown HBM size for {kind!r}: pass --hbm_gib")
    hbm_bytes = int(hbm * GIB)
    sampler_mesh = None
    try:
        mesh = setup.build_mesh(config_without_sampler_mesh(config), devices)  # split by config.dcn_mesh
        shape = setup.sampler_mesh_setting(config)
    except ValueError as error:
        raise AotError(f"config.mesh: {error}") from error
    if (shape is None) != (not sampler_topology):
        raise AotError(
            "--sampler_topology and --config.sampler_mesh go together: the sampler's slice compiles as its "
            "own topology (libtpu compiles a program only over a whole topology's chips)"
        )
    if shape is not None:
        from grpo_jax import sharding

        sampler_devices = topology_devices(sampler_topology)
        if sampler_devices[0].device_kind != kind:
            raise AotError(
                f"--sampler_topology={sampler_topology}: {sampler_devices[0].device_kind}, not {kind}"
            )
        try:
            sampler_mesh = sharding.make_sampler_mesh(shape, sampler_devices)
        except ValueError as error:
            raise AotError(f"--sampler_topology={sampler_topology}: {error}") from error
    with contextlib.ExitStack() as stack:
        if activation_sharding == "batch":
            stack.enter_context(batch_sharded_embeddings(mesh))
        elif activation_sharding != "none":
            raise AotError(f"--activation_sharding={activation_sharding!r}; known: none, batch")
        return _compile_all(
            config,
            topology,
            stage,
            preset,
            programs,
            devices,
            hbm_bytes,
            mesh,
            model_config,
            activation_sharding,
            engine_decode_layout,
            sampler_mesh,
        )


def _compile_all(
    config,
    topology,
    stage,
    preset,
    programs,
    devices,
    hbm_bytes,
    mesh,
    model_config,
    activation_sharding,
    engine_decode_layout=True,
    sampler_mesh=None,
) -> dict:
    import jax

    from grpo_jax.flops import TPU_CHIPS, decode_step_costs, grpo_sampler_flops, grpo_step_flops

    kind = devices[0].device_kind
    chip = TPU_CHIPS.get(kind, {})
    with_engine = bool({"engine", "engine_step"} & set(programs))
    p = build_programs(
        config, stage, model_config, mesh, engine_decode_layout=engine_decode_layout, with_engine=with_engine
    )
    # With config.sampler_mesh the sampler's programs compile on its own mesh, on bf16 weights (what the
    # weight sync lands there); the step on the trainer's mesh.
    ps = p
    if sampler_mesh is not None:
        ps = build_programs(
            config,
            stage,
            model_config,
            sampler_mesh,
            engine_decode_layout=engine_decode_layout,
            with_engine=with_engine,
            sampler_dtype=model_config.compute_dtype,
        )

    report = {
        "topology": topology,
        "device_kind": kind,
        "num_devices": len(devices),
        "hbm_bytes_per_device": hbm_bytes,
        "peak_bf16_flops_per_device": chip.get("peak_bf16_tflops", 0) * 1e12 or None,
        "mesh": dict(mesh.shape),
        "activation_sharding": activation_sharding,
        "stage": stage,
        "model": {
            "preset": preset or None,
            "num_params": model_config.num_params(),
            **{
                k: getattr(model_config, k)
                for k in (
                    "num_layers",
                    "hidden_size",
                    "num_heads",
                    "num_kv_heads",
                    "intermediate_size",
                    "vocab_size",
                    "tie_embeddings",
                    "param_dtype",
                    "dtype",
                    "remat",
                    "attention_impl",
                    "attention_block_size",
                )
            },
        },
        "batch": {
            "prompts": p.prompts,
            "num_generations": p.grpo.num_generations,
            "rows": p.prompts * p.grpo.num_generations,
            "max_prompt_len": p.prompt_len,
            "max_new_tokens": p.new_tokens,
            "num_minibatches": p.grpo.num_minibatches,
            "num_iterations": p.grpo.num_iterations,
            "kl_coef": p.grpo.kl_coef,
            "logprob_chunk_size": int(config.logprob_chunk_size),
            "grad_accum_steps": int(config[stage].get("grad_accum_steps", 1)),
        },
        "lora": None if p.lora is None else p.lora.to_dict(),
        # The train state the step takes (params or adapters, optimizer moments, reference, LoRA base).
        "state_bytes_per_device": _per_device_bytes(p.step_args[0]),
        "jax_version": jax.__version__,
        "programs": {},
    }
    if with_engine:
        report["engine"] = ps.engine_info
    if sampler_mesh is not None:
        report["sampler_mesh"] = dict(sampler_mesh.shape)
        report["weight_sync"] = weight_sync_bytes(model_config, mesh, sampler_mesh)
    if sampler_mesh is not None:
        sync = report["weight_sync"]
        print(
            f"split: trainer mesh {dict(mesh.shape)} on {mesh.devices.size} chips, sampler mesh "
            f"{dict(sampler_mesh.shape)} on {sampler_mesh.devices.size}; weight sync "
            f"{_gib(sync['total_bytes'])} in {sync['dtype']}: "
            f"{_gib(sync['received_bytes_per_sampler_chip'])} into each sampler chip",
            flush=True,
        )
    print(
        f"{topology}: {len(devices)} x {kind}, {_gib(hbm_bytes)} HBM each; mesh {dict(mesh.shape)}; "
        f"model {model_config.num_params() / 1e9:.2f} B params ({model_config.param_dtype} weights, "
        f"{model_config.dtype} compute, remat {model_config.remat}); activation sharding "
        f"{activation_sharding}; stage {stage!r}"
        f"{'' if p.lora is None else f' on rank-{p.lora.rank} LoRA adapters'}: "
        f"{p.prompts} prompts x G={p.grpo.num_generations}, P={p.prompt_len}, L={p.new_tokens}",
        flush=True,
    )
    shape = (p.model_config, p.grpo, p.prompts, p.prompt_len, p.new_tokens)
    analytic = {
        "sampler": grpo_sampler_flops(*shape),
        "grpo_step": grpo_step_flops(*shape),
        "engine": grpo_sampler_flops(*shape),
    }
    if with_engine:  # one decode step over every slot of every shard, the attention over a full table
        info = ps.engine_info
        analytic["engine_step"] = decode_step_costs(
            p.model_config,
            info["shards"] * info["slots_per_shard"],
            info["max_pages"] * info["page_size"],
            info["max_pages"] * info["page_size"],
        )["flops_full_cache"]
    inputs = {
        "sampler": (ps.sampler, ps.sampler_args),
        "grpo_step": (p.step, p.step_args),
        "engine": (ps.engine, ps.sampler_args),
        "engine_step": (ps.engine_step, ps.engine_step_args),
    }
    for name in programs:
        fn, args = inputs[name]
        result = compile_program(fn, args, hbm_bytes)
        result["analytic_flops"] = analytic[name]
        if sampler_mesh is not None:
            result["mesh"] = dict((mesh if name == "grpo_step" else sampler_mesh).shape)
        report["programs"][name] = result
        verdict = "fits" if result["fits"] else "DOES NOT FIT"
        peak = _gib(result["peak_bytes_per_device"])
        line = f"  {name}: {verdict}: peak {peak} of {_gib(hbm_bytes)} per device"
        if "memory" in result:
            m = result["memory"]
            line += (
                f" (arguments {_gib(m['argument_bytes'])}, outputs {_gib(m['output_bytes'])}, aliased "
                f"{_gib(m['alias_bytes'])}, temporaries {_gib(m['temp_bytes'])}); "
                f"XLA cost_analysis {result['xla_flops']:.3e} FLOPs, "
                f"{result['xla_bytes_accessed']:.3e} bytes accessed, collectives' results "
                f"{sum(c['result_bytes'] for c in result['collectives'].values()) / 2**20:.1f} MiB "
                "(loop bodies counted once)"
            )
        else:
            line += f" (compiler: {result['oom'][:200]})"
        line += f"; analytic {result['analytic_flops']:.3e} FLOPs; compile {result['compile_s']} s"
        print(line, flush=True)
    return report


def main(argv):
    del argv
    try:
        report = run(
            _CONFIG.value,
            _TOPOLOGY.value,
            stage=_STAGE.value,
            preset=_MODEL_PRESET.value,
            programs=tuple(_PROGRAMS.value),
            hbm_gib=_HBM_GIB.value,
            activation_sharding=_ACTIVATION_SHARDING.value,
            engine_decode_layout=_ENGINE_DECODE_LAYOUT.value,
            sampler_topology=_SAMPLER_TOPOLOGY.value,
        )
    except AotError as error:
        _fail(error)
    line = json.dumps(report, sort_keys=True)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write(line + "\n")
    print(line)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with a bad config file, key or value reported in one line."""
    try:
        args = flags.FLAGS(argv)
        _CONFIG.value.keys()
    except flags.Error as error:
        _fail(str(error).split("Traceback")[0])
    except (KeyError, AttributeError, OSError) as error:
        _fail(f"--config: {str(error).strip().splitlines()[0]}")
    return args


def entry_point() -> None:
    """The `grpo-aot-compile` console entry point (also `python scripts/aot_compile.py`)."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    entry_point()
