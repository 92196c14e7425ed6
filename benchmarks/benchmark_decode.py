"""Decode-step micro-benchmarks: what the token choice costs inside the decode loop and alone.

    python benchmarks/benchmark_decode.py --preset=cpu --out=benchmarks/cpu_decode.json

The sampler's decode loop without its bookkeeping (`forward_with_cache` in a `lax.fori_loop`, each step
feeding its chosen token to the next) with three token choices, and the choices alone on [B*G, V] random
logits:

loop_argmax        no sampling: the forward alone (nothing is dead code)
loop_sampled       the sampler's choice, `sampling.choose_tokens` (inverse CDF), temperature 1
loop_categorical   `jax.vmap(jax.random.categorical)` with one key per row: V Gumbel draws per row, what
                   the sampler did before the inverse CDF (the same distribution, another random stream)
choice_*           the same choices alone, and both with top_p = 0.9 (`sampling.truncate_logits`: a
                   32-step bisection over float order keys per row; a sort of every row before 2026-12)

Per-step times use the minimum over the repeats (other processes only ever add time); every timing,
the load average and the CPU share the process got are in the JSON. Presets and timing are shared with
benchmarks/benchmark.py (`benchlib.py`); only public names of grpo_jax are used.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from benchlib import PRESETS, BenchConfig, compile_timed, environment, finish, ratio, time_calls, write_json

from grpo_jax import sampling
from grpo_jax.models import forward_with_cache, init_cache, init_params

CHOICES = ("argmax", "sampled", "categorical")
TOP_P = 0.9


def choose(name: str, logits, row_keys, step, *, top_p: float = 1.0):
    """Token [N] int32 from logits [N, V] by the named choice at temperature 1."""
    if name == "argmax":
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if name == "sampled":
        return sampling.choose_tokens(logits, row_keys, step, top_p=top_p)[0]
    if name == "categorical":
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
        truncated = sampling.truncate_logits(logits, top_p=top_p)
        return jax.vmap(jax.random.categorical)(step_keys, truncated).astype(jnp.int32)
    raise ValueError(f"unknown token choice {name!r}; choose from {CHOICES}")


@functools.partial(
    jax.jit, static_argnames=("model", "choice", "prompt_len", "steps"), donate_argnames=("cache",)
)
def decode_loop(model, params, cache, tokens, row_keys, *, choice, prompt_len, steps):
    """`steps` decode steps over a [N, S] cache, each choosing the next token by `choice`.
    -> (cache, last tokens [N, 1])."""
    n, total = tokens.shape[0], cache["k"].shape[2]

    def body(i, carry):
        cache, tokens = carry
        slot = prompt_len + i
        key_mask = jnp.broadcast_to(jnp.arange(total) <= slot, (n, total)).astype(jnp.int32)
        positions = jnp.full((n, 1), slot, jnp.int32)
        logits, cache = forward_with_cache(model, params, tokens, positions, cache, slot, key_mask)
        return cache, choose(choice, logits[:, 0], row_keys, i)[:, None]

    return jax.lax.fori_loop(0, steps, body, (cache, tokens))


@functools.partial(jax.jit, static_argnames=("choice", "top_p"))
def choice_alone(logits, row_keys, step, *, choice, top_p):
    return choose(choice, logits, row_keys, step, top_p=top_p)


def bench_decode(cfg: BenchConfig, params) -> dict[str, Any]:
    """Per-step time of the decode loop with each token choice, and of each choice alone."""
    model, n = cfg.model, cfg.num_rows
    steps = cfg.max_new_tokens - 1
    tokens = jnp.full((n, 1), 5, jnp.int32)
    row_keys = jax.random.split(jax.random.key(3), n)
    results: dict[str, Any] = {"rows": n, "vocab_size": model.vocab_size, "steps": steps}
    for choice in CHOICES:
        cache = init_cache(model, n, cfg.total_len)
        static = dict(choice=choice, prompt_len=cfg.prompt_len, steps=steps)
        loop, compile_s = compile_timed(decode_loop, model, params, cache, tokens, row_keys, **static)
        holder = {"cache": cache}

        def run(loop=loop, holder=holder):
            holder["cache"], last = loop(params, holder["cache"], tokens, row_keys)
            return last

        timing = time_calls(run, cfg.repeats)
        results[f"loop_{choice}"] = {"compile_s": compile_s, **timing, "per_step_s": timing["min_s"] / steps}
    logits = jax.random.normal(jax.random.key(2), (n, model.vocab_size), jnp.float32)
    step = jnp.asarray(3)
    for choice in ("sampled", "categorical"):
        for suffix, top_p in (("", 1.0), ("_top_p", TOP_P)):
            fn, compile_s = compile_timed(choice_alone, logits, row_keys, step, choice=choice, top_p=top_p)
            timing = time_calls(lambda fn=fn: fn(logits, row_keys, step), cfg.repeats * 4)
            results[f"choice_{choice}{suffix}"] = {"compile_s": compile_s, "top_p": top_p, **timing}
    per_step = lambda choice: results[f"loop_{choice}"]["per_step_s"]
    results["choice_in_loop_sampled_s"] = per_step("sampled") - per_step("argmax")
    results["choice_in_loop_categorical_s"] = per_step("categorical") - per_step("argmax")
    results["sampled_loop_over_categorical"] = ratio(per_step("sampled"), per_step("categorical"))
    results["sampled_choice_over_categorical"] = ratio(
        results["choice_sampled"]["min_s"], results["choice_categorical"]["min_s"]
    )
    return results


def run(cfg: BenchConfig, *, command: str = "") -> dict[str, Any]:
    report: dict[str, Any] = {**environment(command), "config": cfg.to_dict()}
    start, cpu_start = time.perf_counter(), time.process_time()
    report["decode_variants"] = bench_decode(cfg, init_params(cfg.model, jax.random.key(0)))
    return finish(report, start, cpu_start)


def format_table(report: dict[str, Any]) -> str:
    ms = lambda s: f"{s * 1e3:.2f} ms"
    var = report["decode_variants"]
    rows = [
        ("device", f"{report['backend']} / {report['device_kind']} ({report['cpu_count']} cpus)"),
        (
            "load average start/end",
            f"{report['load_average_start'][0]:.2f} / {report['load_average_end'][0]:.2f}",
        ),
        ("rows x vocab", f"{var['rows']} x {var['vocab_size']}"),
    ]
    rows += [(f"decode loop, {c}", f"{ms(var[f'loop_{c}']['per_step_s'])} / step") for c in CHOICES]
    rows += [
        (
            "token choice in the loop, sampled / categorical",
            f"{ms(var['choice_in_loop_sampled_s'])} / {ms(var['choice_in_loop_categorical_s'])}",
        ),
        (
            "token choice alone, sampled / categorical",
            f"{ms(var['choice_sampled']['min_s'])} / {ms(var['choice_categorical']['min_s'])}",
        ),
        (
            f"  with top_p = {TOP_P}",
            f"{ms(var['choice_sampled_top_p']['min_s'])} / {ms(var['choice_categorical_top_p']['min_s'])}",
        ),
        ("process cpu share", f"{report['process_cpu_share']:.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: Sequence[str]) -> None:
    from absl import flags

    FLAGS = flags.FLAGS
    cfg = PRESETS[FLAGS.preset]()
    if FLAGS.repeats:
        cfg = dataclasses.replace(cfg, repeats=FLAGS.repeats)
    report = run(cfg, command=shlex.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]))
    print(format_table(report))
    if FLAGS.out:
        write_json(report, FLAGS.out)
        print(f"wrote {FLAGS.out}")


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_enum("preset", "cpu", sorted(PRESETS), "Model and batch setting (benchlib.py).")
    flags.DEFINE_string("out", None, "Write the JSON report here.")
    flags.DEFINE_integer("repeats", None, "Override the preset's timed calls per measurement.")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
