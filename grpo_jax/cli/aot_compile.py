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
import json  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from grpo_jax.cli.aot_programs import (  # noqa: E402
    AotError,
    batch_sharded_embeddings,
    build_programs,
    config_without_sampler_mesh,
    grpo_stage_name,
    model_config_for,
    per_device_bytes,
    topology_devices,
)
from grpo_jax.cli.aot_report import compile_program, weight_sync_bytes  # noqa: E402

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


def _fail(message: str) -> None:
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    sys.exit(1)


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
        "state_bytes_per_device": per_device_bytes(p.step_args[0]),
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
