"""Time a config's one-program GRPO step (and its sampler) in-process, A/B model variants alternated in
one run, and show where XLA:CPU spends the time, op by op, from the JAX profiler.

    python benchmarks/profile_step.py --config=configs/bench_trl_d.py:large \
        --variant=remat=none --variant=remat=dots --rounds=5
    python benchmarks/profile_step.py --config=configs/bench_trl_d.py:large --profile=grpo_step --top=25

The step is built as `scripts/train.py` builds it (`make_grpo_step` with the stage's GRPOConfig,
optimizer, logprob chunk and shared-prefix switch) on one device and a random model with the config's
shapes, and is fed random rollouts of exactly max_prompt_len + max_new_tokens tokens. Each round calls
every variant's step once, then times a 2048^3 fp32 matmul (`benchlib.measure_peak_matmul`). The
report gives each variant's median and min step time and the fraction of the best measured matmul rate
that its work reaches. "Work" is the FLOPs the step really computes (`grpo_jax.flops.grpo_update_flops_done`:
with shared prefix each prompt once per group, the vocabulary projection on completion positions only).

`--profile=grpo_step` or `--profile=sampler` traces one more call of the first variant and prints the
time of each compiled op kind (`ynn_fusion` = the matmuls; the rest is layout copies, elementwise
fusions and loop bookkeeping) and the slowest ops with their HLO shape and the JAX op they come from.
Times are summed over XLA's worker threads, so they add up to more than the wall time.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_VARIANTS = flags.DEFINE_multi_string("variant", [], "MODEL_FIELD=VALUE[,FIELD=VALUE]: one variant each.")
_ROUNDS = flags.DEFINE_integer("rounds", 4, "Timed calls per variant (alternated).")
_PROFILE = flags.DEFINE_enum("profile", "", ["", "grpo_step", "sampler"], "Program to profile op by op.")
_TOP = flags.DEFINE_integer("top", 20, "Slowest ops listed by --profile.")


def parse_variant(text: str) -> dict:
    """'remat=dots,scan_layers=False' -> {'remat': 'dots', 'scan_layers': False}."""
    out = {}
    for item in filter(None, text.split(",")):
        if "=" not in item:
            raise app.UsageError(f"--variant={text!r}: expected FIELD=VALUE[,FIELD=VALUE]")
        key, value = item.split("=", 1)
        lowered = value.lower()
        if lowered in ("true", "false"):
            out[key] = lowered == "true"
        else:
            try:
                out[key] = int(value)
            except ValueError:
                out[key] = value
    return out


def model_config(config, overrides: dict):
    """The config's model as `scripts/train.py` builds it (`setup.build_model_config`; a pretrained
    directory gives its shapes only: the weights are random), with the variant's fields replaced."""
    import types

    from grpo_jax.models import ModelConfig
    from grpo_jax.training import setup

    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise app.UsageError(f"--variant: {unknown} are not ModelConfig fields")
    tokenizer = types.SimpleNamespace(vocab_size=int(config.tokenizer.get("vocab_size", 0)))
    return dataclasses.replace(setup.build_model_config(config, tokenizer), **overrides)


def random_batch(config, model, rows: int, group: int):
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    prompts, length = rows // group, config.max_new_tokens
    return dict(
        prompt_tokens=jnp.asarray(
            np.repeat(rng.integers(3, model.vocab_size, (prompts, config.max_prompt_len)), group, 0),
            jnp.int32,
        ),
        prompt_mask=jnp.ones((rows, config.max_prompt_len), jnp.int32),
        completion_tokens=jnp.asarray(rng.integers(3, model.vocab_size, (rows, length)), jnp.int32),
        completion_mask=jnp.ones((rows, length), jnp.int32),
        old_logprobs=jnp.asarray(-6.0 + 0.1 * rng.standard_normal((rows, length)), jnp.float32),
        truncated=jnp.zeros((rows,), bool),
        host_rewards=jnp.asarray(rng.standard_normal(rows), jnp.float32),
    )


def build(config, overrides: dict):
    """(name, step, state, batch, sample) for one variant: the step and a no-argument sampler call."""
    import jax

    from grpo_jax import models, sampling, sharding
    from grpo_jax.training import create_train_state, make_grpo_step, make_optimizer, setup

    stage = config.grpo
    model = model_config(config, overrides)
    grpo = setup.grpo_config(stage)
    G, rows = grpo.num_generations, stage.prompts_per_step * grpo.num_generations
    optimizer = make_optimizer(setup.optimizer_config(stage, int(stage.steps)))
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    param_sh = models.model_param_shardings(mesh, model)
    params = jax.device_put(models.init_params(model, jax.random.key(0)), param_sh)
    state, state_sh = create_train_state(
        params, optimizer, mesh, param_sh, rng=jax.random.key(0), with_reference=grpo.kl_coef > 0
    )
    step = make_grpo_step(
        grpo,
        model,
        optimizer,
        mesh=mesh,
        state_shardings=state_sh,
        logprob_chunk_size=int(config.logprob_chunk_size),
        grad_accum_steps=int(stage.get("grad_accum_steps", 1)),
        shared_prefix=bool(stage.get("shared_prefix", False)),
    )
    batch = random_batch(config, model, rows, G)
    prompts = batch["prompt_tokens"][::G], batch["prompt_mask"][::G]

    def sample():
        return sampling.generate(
            model, params, *prompts, jax.random.key(1), num_samples=G, max_new_tokens=config.max_new_tokens,
            min_new_tokens=config.max_new_tokens, temperature=grpo.temperature, eos_id=1,
        )  # fmt: skip

    name = ",".join(f"{k}={v}" for k, v in overrides.items()) or "config"
    return dict(
        name=name, model=model, grpo=grpo, step=step, state=state, batch=batch, sample=sample, times=[]
    )


def hlo_ops(hlo_text: str) -> dict[str, str]:
    """{instruction name: "shape  jax op"} from a compiled module's text."""
    ops = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
        if match:
            source = re.search(r'op_name="([^"]*)"', line)
            ops[match.group(1)] = f"{match.group(2)}  {source.group(1)[-70:] if source else ''}"
    return ops


def op_profile(call, top: int, hlo_text: str = "") -> str:
    """Per-op-kind and slowest-op tables of one traced call (XLA:CPU thunks, summed over threads); with
    the compiled module's text, each slow op gets its shape and the JAX op it comes from."""
    import jax
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        jax.block_until_ready(call())
        jax.profiler.stop_trace()
        path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
        data = ProfileData.from_file(path)
    per_op: collections.Counter = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:
                continue
            for event in line.events:
                if event.name != "ThunkExecutor::Execute":
                    per_op[event.name] += event.duration_ns
    kinds: collections.Counter = collections.Counter()
    for name, ns in per_op.items():
        kinds[re.sub(r"\.\d+$", "", name)] += ns
    total = sum(kinds.values()) or 1
    lines = ["op kind | ms | share", "---|---:|---:"]
    lines += [f"{kind} | {ns / 1e6:.1f} | {100 * ns / total:.1f} %" for kind, ns in kinds.most_common(12)]
    described = hlo_ops(hlo_text)
    lines += ["", "slowest ops | ms | shape and source"]
    lines += [f"{name} | {ns / 1e6:.1f} | {described.get(name, '')}" for name, ns in per_op.most_common(top)]
    return "\n".join(lines)


def run(config, variants: Sequence[dict], rounds: int, profile: str = "", top: int = 20) -> list[dict]:
    """Build every variant, alternate `rounds` timed steps, print and return the per-variant summary."""
    import jax
    from benchlib import measure_peak_matmul

    from grpo_jax.flops import grpo_update_flops_done

    runs = [dict(build(config, v), times=[]) for v in (variants or [{}])]
    for r in runs:  # compile
        r["state"], metrics = r["step"](r["state"], r["batch"])
        jax.block_until_ready(metrics)
    rates = []
    for _ in range(rounds):
        for r in runs:
            t0 = time.perf_counter()
            r["state"], metrics = r["step"](r["state"], r["batch"])
            jax.block_until_ready(metrics)
            r["times"].append(time.perf_counter() - t0)
        rates.append(measure_peak_matmul(2048, "float32", repeats=1)["gflops"] * 1e9)
    peak = max(rates)
    stage = config.grpo
    print(f"best fp32 matmul rate over the run: {peak / 1e9:.0f} GFLOP/s")
    summary = []
    for r in runs:
        work = grpo_update_flops_done(
            r["model"], r["grpo"], stage.prompts_per_step, config.max_prompt_len, config.max_new_tokens,
            shared_prefix=bool(stage.get("shared_prefix", False)),
        )  # fmt: skip
        median = statistics.median(r["times"])
        row = dict(
            variant=r["name"], median_s=median, min_s=min(r["times"]), fraction_of_peak=work / median / peak
        )
        summary.append(row)
        print(
            f"{r['name']:40s} step median {median:.3f} s, min {row['min_s']:.3f} s; "
            f"{work / median / 1e9:.0f} GFLOP/s done"
            f" = {100 * row['fraction_of_peak']:.0f} % of the matmul rate"
        )
    if profile:
        first = runs[0]
        hlo_text = ""
        if profile == "sampler":
            jax.block_until_ready(first["sample"]())  # compile
            call = first["sample"]
        else:
            hlo_text = first["step"].lower(first["state"], first["batch"]).compile().as_text()

            def call():
                first["state"], metrics = first["step"](first["state"], first["batch"])
                return metrics

        print(f"\n{profile} of {first['name']}, one call:\n" + op_profile(call, top, hlo_text))
    return summary


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required")
    run(config, [parse_variant(v) for v in _VARIANTS.value], _ROUNDS.value, _PROFILE.value, _TOP.value)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(app.run(main))
