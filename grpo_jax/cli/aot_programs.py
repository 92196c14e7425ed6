"""What `grpo-aot-compile` (grpo_jax/cli/aot_compile.py) compiles: the config's model, the topology's
compile-only devices, and the sampler, GRPO step and rollout engine as `scripts/train.py` builds them,
with `jax.ShapeDtypeStruct` inputs carrying the trainer's shardings (nothing runs, no weights are read).
Module-level imports are stdlib only: the CLI sets JAX_PLATFORMS before JAX is imported."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os


class AotError(Exception):
    """A problem with the flags, the config or the topology: reported in one line."""


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


def shape_structs(tree, shardings):
    """`tree`'s leaves as `jax.ShapeDtypeStruct`s carrying `shardings` (a matching tree)."""
    import jax

    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def per_device_bytes(tree) -> int:
    """Bytes one device holds of the sharded `ShapeDtypeStruct`s in `tree` (its shard of each leaf)."""
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
    params = shape_structs(
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
        adapters = shape_structs(
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
            sampler_params = shape_structs(attached, dict(param_shardings, layers=layers))
        else:
            compute = model_config.compute_dtype
            merged = jax.eval_shape(
                lambda b, a: lora_lib.merge(lora_lib.attach(b, a), compute), base, adapters
            )
            sampler_params = shape_structs(merged, param_shardings)
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
    state = shape_structs(state_shapes, shardings)
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
