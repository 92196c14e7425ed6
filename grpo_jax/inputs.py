"""What the public API accepts for a PRNG key and for a dtype, normalised in one place.

PRNG keys: JAX has two spellings of a key, and most code passes the older one.
  - a typed key, `jax.random.key(seed)`: a scalar array of dtype `key<fry>`;
  - a raw key, `jax.random.PRNGKey(seed)`: a uint32 array of shape (2,) (the default implementation's
    key data).
`as_key` turns either into a typed key, so `fold_in`/`split` results keep the shape the code expects.
A raw key and the typed key that wraps it (`jax.random.wrap_key_data`) give identical results.

Dtypes: `canonical_dtype` accepts a name ("bfloat16", "bf16", "float32", "fp32", ...) or a dtype object
(`jnp.bfloat16`, `np.float32`, `jnp.dtype("bfloat16")`) and returns the canonical name, which is what a
`ModelConfig` stores (it is hashed as a jit static argument and written to JSON).

Either raises one line naming the argument and what it accepts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Canonical names of the floating dtypes a model's weights and activations may have.
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16"}

_KEY_HELP = "a PRNG key (jax.random.key(seed), or jax.random.PRNGKey(seed): uint32 of shape {shape})"


@functools.lru_cache(maxsize=1)
def _raw_key_shape() -> tuple[int, ...]:
    """Shape of the default PRNG implementation's raw key data: (2,) for threefry."""
    return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape


def _describe(value) -> str:
    dtype, shape = getattr(value, "dtype", None), getattr(value, "shape", None)
    if dtype is not None and shape is not None:
        return f"an array of dtype {dtype} and shape {tuple(shape)}"
    return f"{type(value).__name__} {value!r}"


def as_key(rng, name: str = "rng") -> jax.Array:
    """A single typed PRNG key from a typed key (`jax.random.key`) or a raw key (`jax.random.PRNGKey`).

    Works on concrete arrays and on tracers (it only looks at dtype and shape). Raises TypeError for
    anything that is not a key (an int seed, a float array) and ValueError for a batch of keys.
    """
    dtype, shape = getattr(rng, "dtype", None), getattr(rng, "shape", None)
    raw_shape = _raw_key_shape()
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if tuple(shape) != ():
            raise ValueError(f"{name} must be a single PRNG key, got a key array of shape {tuple(shape)}")
        return rng
    if dtype is not None and np.dtype(dtype) == np.uint32:
        if tuple(shape) != raw_shape:
            raise ValueError(
                f"{name} must be a single PRNG key; a raw key is uint32 of shape {raw_shape}, "
                f"got shape {tuple(shape)}"
            )
        return jax.random.wrap_key_data(rng)
    raise TypeError(f"{name} must be {_KEY_HELP.format(shape=raw_shape)}, got {_describe(rng)}")


def canonical_dtype(value, name: str = "dtype", allowed: tuple[str, ...] = DTYPES) -> str:
    """The canonical name ("float32", "bfloat16", "float16") of a dtype given by name or object."""
    canonical = None
    if isinstance(value, str):
        key = value.strip().lower()
        canonical = DTYPE_ALIASES.get(key, key)
    elif value is not None and not isinstance(value, (bool, int, float)):
        try:
            canonical = jnp.dtype(value).name
        except TypeError:
            canonical = None
    if canonical not in allowed:
        shown = getattr(value, "__name__", None) if isinstance(value, type) else None
        raise ValueError(
            f"{name} must be one of {', '.join(allowed)} (a name, an alias such as 'bf16', or a dtype such "
            f"as jnp.bfloat16), got {shown or repr(value)}"
        )
    return canonical
