"""The engine's decode attention alone, in the forms XLA:CPU could be given, at the uniform peer setting.

benchmarks/README.md ("The engine's decode step at uniform lengths") quotes these numbers: one layer's
paged decode attention (S = 64 slots, K = 2 KV heads, G = 2 queries per KV head, Dh = 64, page size 16,
6 pages a slot, lengths 33-96) timed alone in a jitted 64-step loop, for

- `committed`: `rollout.paged_cache.paged_attention_reference` as it is;
- `keys_untransposed`: the same with q·k as `kstd,ksgd->kstg` (keys as the untransposed operand), the
  scores transposed after;
- and the gather alone: `pages[:, table]` (what the reference does) against one row per page of the
  pages seen as `[K * pages, page_size * Dh]`;

and how fast this machine reads 17 MiB (the keys and values a uniform decode step attends to) and 64 MiB.
Each figure is the fastest of `--repeats` loops; the forms alternate within a round. Prints one JSON line.

    python benchmarks/decode_attention_forms.py [--repeats=5]
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
from benchlib import time_calls

from grpo_jax.rollout.paged_cache import paged_attention_reference

KV_HEADS, SLOTS, GROUP, HEAD_DIM, PAGE_SIZE, MAX_PAGES, TOTAL_PAGES, STEPS = 2, 64, 2, 64, 16, 6, 1348, 64


def keys_untransposed(q, k_pages, v_pages, lengths, table):
    """`paged_attention_reference`'s single-gather path with q·k written keys-first."""
    s, max_pages = table.shape
    kv_heads, _, page_size, dh = k_pages.shape
    t = max_pages * page_size
    grouped = q.reshape(s, kv_heads, -1, dh).swapaxes(0, 1)
    k = k_pages[:, table].reshape(kv_heads, s, t, dh)
    v = v_pages[:, table].reshape(kv_heads, s, t, dh)
    scores = jnp.einsum("kstd,ksgd->kstg", k, grouped).swapaxes(2, 3) / math.sqrt(dh)
    valid = (jnp.arange(t)[None, :] < lengths[:, None])[None, :, None, :]
    probs = jnp.where(valid, jax.nn.softmax(jnp.where(valid, scores, -1e30), axis=-1), 0.0)
    return jnp.einsum("ksgt,kstd->ksgd", probs, v).swapaxes(0, 1).reshape(q.shape)


def gather_4d(pages, table):
    return pages[:, table]


def gather_rows(pages, table):
    kv_heads, total, page_size, dh = pages.shape
    rows = (jnp.arange(kv_heads)[:, None, None] * total + table[None]).reshape(-1)
    return jnp.take(pages.reshape(kv_heads * total, page_size * dh), rows, axis=0, mode="clip")


def timed_loop(step, operands, repeats: int) -> float:
    """Fastest µs per iteration of `step(i, operands)` summed over a jitted STEPS-long loop (the page
    table shifts with i, so nothing is hoisted out of it)."""

    @jax.jit
    def loop(*operands):
        return jax.lax.fori_loop(0, STEPS, lambda i, acc: acc + jnp.sum(step(i, *operands)), 0.0)

    return 1e6 * time_calls(lambda: loop(*operands), repeats)["min_s"] / STEPS


def read_rate(mebibytes: int, repeats: int) -> float:
    """GiB/s of a jitted sum over `mebibytes` MiB of float32 (17 MiB may stay partly in the CPU's cache)."""
    x = jnp.ones((mebibytes * 2**20 // 4 // 64, 64))
    total = jax.jit(lambda x: jnp.sum(x, axis=0))
    return mebibytes / 1024 / time_calls(lambda: total(x), max(repeats, 10))["min_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    keys = jax.random.split(jax.random.key(0), 4)
    shape = (KV_HEADS, TOTAL_PAGES, PAGE_SIZE, HEAD_DIM)
    k_pages, v_pages = jax.random.normal(keys[0], shape), jax.random.normal(keys[1], shape)
    table = jax.random.randint(keys[2], (SLOTS, MAX_PAGES), 0, TOTAL_PAGES)
    lengths = jax.random.randint(keys[3], (SLOTS,), 33, MAX_PAGES * PAGE_SIZE + 1)
    q = jax.random.normal(keys[0], (SLOTS, KV_HEADS * GROUP, HEAD_DIM))
    shifted = lambda i, table: (table + i) % TOTAL_PAGES  # noqa: E731
    attention = {
        "committed": lambda i, q, k, v, t: paged_attention_reference(q, k, v, lengths, shifted(i, t)),
        "keys_untransposed": lambda i, q, k, v, t: keys_untransposed(q, k, v, lengths, shifted(i, t)),
    }
    gathers = {"gather_4d": gather_4d, "gather_rows": gather_rows}
    results: dict = {name: [] for name in (*attention, *gathers)}
    for _ in range(3):
        for name, fn in attention.items():
            results[name].append(timed_loop(fn, (q, k_pages, v_pages, table), args.repeats))
        for name, fn in gathers.items():
            step = lambda i, pages, t, fn=fn: fn(pages, shifted(i, t))  # noqa: E731
            results[name].append(timed_loop(step, (k_pages, table), args.repeats))
    out = {f"{name}_us": round(min(times), 1) for name, times in results.items()}
    out.update({f"read_{mib}mib_gib_per_s": round(read_rate(mib, args.repeats), 1) for mib in (17, 64)})
    out["device"] = jax.devices()[0].device_kind
    print(json.dumps(out))


if __name__ == "__main__":
    main()
