"""What GRPO saves: compiled memory and step time of the GRPO step against PPO with a critic, same rollouts.

    python benchmarks/benchmark_ppo.py --preset=ppo_vs_grpo --out=benchmarks/grpo_vs_ppo_step.json
    python benchmarks/benchmark_ppo.py --cpu_scheduler=concurrency --out=benchmarks/grpo_vs_ppo_step_conc.json

Both steps train on the same B × G rollouts (DeepSeekMath arXiv 2402.03300 §4.1: GRPO drops PPO's value
model, "usually another model of comparable size as the policy model"). Both keep a frozen reference
(β > 0) and AdamW; PPO adds the critic (a copy of the policy's backbone plus a scalar head) and the
critic's AdamW moments in its state, and the critic's forward/backward in its program. For each
variant (activation remat and minibatches, which set how much of the memory is activations rather than
parameters) the script lowers and compiles both steps, reads `compiled.memory_analysis()`, and times
the median step over a few calls after a warm-up. The headline is `grpo_over_ppo` of argument + temp
bytes (state and batch in, plus XLA's scratch; outputs alias the donated state). The issue's goal is
GRPO ≤ 0.6 × PPO.

On CPU, `--cpu_scheduler` picks XLA's instruction scheduler. "memory" (the default here) minimises live
memory, as accelerator backends do. "concurrency" is XLA:CPU's default: it runs independent work side by
side, so PPO's policy and critic passes are alive together and its temp is nearly the sum of both
(an optimization barrier between them does not change that).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from grpo_jax import models, sampling, sharding
from grpo_jax.algorithms import GRPOConfig, PPOConfig
from grpo_jax.models import ModelConfig, init_params
from grpo_jax.training import (
    OptimizerConfig,
    create_ppo_state,
    create_train_state,
    make_grpo_step,
    make_optimizer,
    make_ppo_step,
    make_value_optimizer,
    rollout_to_batch,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setting:
    """B prompts of P tokens, G completions of L tokens each; both steps μ = 1, β = kl_coef.
    variants: name -> (remat policy, number of minibatches)."""

    model: ModelConfig
    num_prompts: int
    num_generations: int
    prompt_len: int
    max_new_tokens: int
    variants: dict[str, tuple[str, int]]
    steps: int = 3
    kl_coef: float = 0.04
    logprob_chunk_size: int = 32


_MODEL_8x512 = dict(
    vocab_size=512, hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=8
)

PRESETS: dict[str, Callable[[], Setting]] = {
    # 27.8 M parameters (fp32, 111 MB): the "no remat, one minibatch" variant is activation-dominated,
    # full remat with 4 minibatches is parameter-dominated.
    "ppo_vs_grpo": lambda: Setting(
        model=ModelConfig(**_MODEL_8x512),
        num_prompts=8,
        num_generations=8,
        prompt_len=32,
        max_new_tokens=64,
        variants={"no_remat_1_minibatch": ("none", 1), "remat_full_4_minibatches": ("full", 4)},
    ),
    "tiny": lambda: Setting(
        model=ModelConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
        ),
        num_prompts=2,
        num_generations=4,
        prompt_len=4,
        max_new_tokens=4,
        variants={"no_remat_1_minibatch": ("none", 1)},
        steps=1,
    ),
}


def memory_stats(compiled) -> dict[str, int]:
    """`compiled.memory_analysis()` fields, plus argument + temp and argument + temp + output − alias
    (the most that is live at once; XLA's own `peak_memory_in_bytes` is not meaningful on CPU)."""
    stats = compiled.memory_analysis()
    fields = {name: int(getattr(stats, name)) for name in dir(stats) if name.endswith("_in_bytes")}
    fields["argument_plus_temp_bytes"] = fields["argument_size_in_bytes"] + fields["temp_size_in_bytes"]
    fields["live_upper_bound_bytes"] = (
        fields["argument_plus_temp_bytes"] + fields["output_size_in_bytes"] - fields["alias_size_in_bytes"]
    )
    return fields


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def timed_steps(compiled, state, batch, steps: int) -> dict[str, Any]:
    """Median wall time of `steps` calls after one warm-up; the state is donated, so it is threaded."""
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def bench_variant(setting: Setting, remat: str, num_minibatches: int, params, batch) -> dict[str, Any]:
    model = dataclasses.replace(setting.model, remat=remat)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    opt_config = OptimizerConfig(learning_rate=1e-6)
    optimizer = make_optimizer(opt_config)
    param_sh = models.model_param_shardings(mesh, model)
    params = jax.device_put(params, param_sh)
    common = dict(mesh=mesh, logprob_chunk_size=setting.logprob_chunk_size)
    grpo = GRPOConfig(
        num_generations=setting.num_generations, kl_coef=setting.kl_coef, num_minibatches=num_minibatches
    )
    ppo = PPOConfig(
        num_generations=setting.num_generations, kl_coef=setting.kl_coef, num_minibatches=num_minibatches
    )
    value_optimizer = make_value_optimizer(ppo, opt_config)
    builders = {
        "grpo": lambda: (
            create_train_state(params, optimizer, mesh, param_sh, rng=jax.random.key(0), with_reference=True),
            lambda sh: make_grpo_step(grpo, model, optimizer, state_shardings=sh, **common),
        ),
        "ppo": lambda: (
            create_ppo_state(
                params, optimizer, value_optimizer, mesh, model, rng=jax.random.key(0), with_reference=True
            ),
            lambda sh: make_ppo_step(ppo, model, optimizer, value_optimizer, state_shardings=sh, **common),
        ),
    }
    out: dict[str, Any] = {"remat": remat, "num_minibatches": num_minibatches}
    for name, build in builders.items():
        (state, state_sh), make_step = build()
        start = time.perf_counter()
        compiled = make_step(state_sh).lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        out[name] = {
            "compile_s": compile_s,
            "state_bytes": tree_bytes(state),
            "critic_and_its_adam_bytes": tree_bytes(state.aux),
            "memory": memory_stats(compiled),
            "step_time": timed_steps(compiled, state, batch, setting.steps),
        }
        del state, compiled
    ratio = lambda key: out["grpo"]["memory"][key] / out["ppo"]["memory"][key]
    out["grpo_over_ppo"] = {
        "argument_plus_temp": ratio("argument_plus_temp_bytes"),
        "temp": ratio("temp_size_in_bytes"),
        "argument": ratio("argument_size_in_bytes"),
        "live_upper_bound": ratio("live_upper_bound_bytes"),
        "median_step_time": out["grpo"]["step_time"]["median_s"] / out["ppo"]["step_time"]["median_s"],
    }
    out["goal_grpo_le_0.6x_ppo_met"] = out["grpo_over_ppo"]["argument_plus_temp"] <= 0.6
    return out


def run(setting: Setting, command: str = "") -> dict[str, Any]:
    """Sample the rollouts once (no early stop), then measure every variant on them."""
    model = setting.model
    params = init_params(model, jax.random.key(0))
    prompts = np.random.default_rng(0).integers(
        2, model.vocab_size, (setting.num_prompts, setting.prompt_len)
    )
    rollout = sampling.generate(
        model,
        params,
        prompts.astype(np.int32),
        np.ones_like(prompts, np.int32),
        jax.random.key(1),
        num_samples=setting.num_generations,
        max_new_tokens=setting.max_new_tokens,
        eos_id=model.vocab_size,
    )
    rows = setting.num_prompts * setting.num_generations
    host_rewards = jax.random.normal(jax.random.key(2), (rows,))
    batch = rollout_to_batch(rollout, {}, setting.num_generations, host_rewards=host_rewards)
    report: dict[str, Any] = {
        "command": command,
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average_start": list(os.getloadavg()),
        "setting": {
            **{k: v for k, v in dataclasses.asdict(setting).items() if k != "model"},
            "model": model.to_dict(),
            "model_num_params": model.num_params(),
            "param_bytes": tree_bytes(params),
            "rows": rows,
        },
        "variants": {
            name: bench_variant(setting, remat, minibatches, params, batch)
            for name, (remat, minibatches) in setting.variants.items()
        },
        "load_average_end": list(os.getloadavg()),
    }
    return report


def format_table(report: dict[str, Any]) -> str:
    mib = lambda b: f"{b / 2**20:8.1f} MiB"
    lines = [
        f"model {report['setting']['model_num_params'] / 1e6:.1f} M params, {report['setting']['rows']} rows"
    ]
    for name, v in report["variants"].items():
        lines.append(f"{name}:")
        for algo in ("grpo", "ppo"):
            m, t = v[algo]["memory"], v[algo]["step_time"]
            lines.append(
                f"  {algo:4s} argument {mib(m['argument_size_in_bytes'])}"
                f"  temp {mib(m['temp_size_in_bytes'])}"
                f"  argument+temp {mib(m['argument_plus_temp_bytes'])}  step {t['median_s']:.3f} s"
            )
        r = v["grpo_over_ppo"]
        lines.append(
            f"  GRPO/PPO argument+temp {r['argument_plus_temp']:.3f}  temp {r['temp']:.3f}"
            f"  step time {r['median_step_time']:.3f}  goal <= 0.6 met: {v['goal_grpo_le_0.6x_ppo_met']}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    import json

    from absl import flags

    FLAGS = flags.FLAGS
    if FLAGS.cpu_scheduler == "memory":  # read when the backend starts, which has not happened yet
        flag = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    setting = PRESETS[FLAGS.preset]()
    if FLAGS.steps:
        setting = dataclasses.replace(setting, steps=FLAGS.steps)
    report = run(setting, command=shlex.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]))
    print(format_table(report))
    if FLAGS.out:
        os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_enum("preset", "ppo_vs_grpo", sorted(PRESETS), "Model and batch setting (see PRESETS).")
    flags.DEFINE_string("out", None, "Write the JSON report here.")
    flags.DEFINE_integer("steps", None, "Override the preset's timed steps.")
    flags.DEFINE_enum("cpu_scheduler", "memory", ["memory", "concurrency"], "XLA:CPU scheduler (see above).")
    app.run(main)
