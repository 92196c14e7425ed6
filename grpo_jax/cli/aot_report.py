"""How `grpo-aot-compile` (grpo_jax/cli/aot_compile.py) reports a compiled program: per-device memory
against the chip's HBM (or the compiler's out-of-memory figure), XLA's FLOPs and bytes, the collectives in
the program text, and the weight sync's bytes per chip. Module-level imports are stdlib only."""

from __future__ import annotations

import math
import re
import time

from grpo_jax.cli.aot_programs import per_device_bytes, shape_structs

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
    own = per_device_bytes(shape_structs(cast, models.model_param_shardings(trainer_mesh, model_config)))
    received = per_device_bytes(shape_structs(cast, models.model_param_shardings(sampler_mesh, model_config)))
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

    result: dict = {"unpadded_input_bytes_per_device": per_device_bytes(args)}
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
