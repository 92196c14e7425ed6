"""Registry of in-graph rewards: names -> factories, and the weighted combination the GRPO step calls.

A factory is `make(token_spec, **kwargs) -> fn(batch, params=None) -> float32 [N]`. Config names rewards
with weights, e.g. `rewards = [("format", 0.1), ("accuracy", 1.0), ("overlong", 1.0, {"max_len": 512,
"cache_len": 128})]`; `make_reward_fns` turns that into one pure function for the jitted step.

Per-example routing (R1's all-scenario RL, arXiv 2501.12948 §2.3.4: rule rewards for reasoning prompts, a
reward model for general ones): the option `"on": "verifiable"` or `"on": "open"` applies a reward only to
the rows whose `batch["route"]` (int32 [N], index into `ROUTES`) names that kind; 0 elsewhere.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

RewardFn = Callable[..., jax.Array]
RewardFactory = Callable[..., RewardFn]

IN_GRAPH_REWARDS: dict[str, RewardFactory] = {}

# Kinds of prompts a reward can be routed to; `batch["route"]` holds the index of each row's kind.
ROUTES = ("verifiable", "open")

_BUILTIN_MODULES = ("grpo_jax.rewards.in_graph", "grpo_jax.rewards.reward_model")


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator: register `factory(token_spec, **kwargs) -> fn(batch, params=None)` under `name`."""

    def decorate(factory: RewardFactory) -> RewardFactory:
        existing = IN_GRAPH_REWARDS.get(name)
        if existing is not None and existing.__qualname__ != factory.__qualname__:
            raise ValueError(f"in-graph reward {name!r} is already registered by {existing.__module__}")
        IN_GRAPH_REWARDS[name] = factory
        return factory

    return decorate


def _register_builtin_rewards() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def _accepted_options(factory: RewardFactory) -> set[str]:
    params = list(inspect.signature(factory).parameters.values())[1:]
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def make_reward(name: str, token_spec: Any, **kwargs) -> RewardFn:
    """Build one registered reward. Unknown name or option -> ValueError listing the known ones."""
    _register_builtin_rewards()
    if name not in IN_GRAPH_REWARDS:
        raise ValueError(f"unknown in-graph reward {name!r}; known: {sorted(IN_GRAPH_REWARDS)}")
    factory = IN_GRAPH_REWARDS[name]
    accepted = _accepted_options(factory)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"in-graph reward {name!r}: unknown option(s) {unknown}; accepted: {sorted(accepted)}"
        )
    try:
        return factory(token_spec, **kwargs)
    except TypeError as e:
        raise ValueError(f"in-graph reward {name!r}: {e}") from e


def _normalise_spec(spec: Sequence) -> tuple[str, float, dict[str, Any]]:
    if isinstance(spec, str) or not 2 <= len(spec) <= 3:
        raise ValueError(f"reward spec must be (name, weight) or (name, weight, kwargs), got {spec!r}")
    name, weight = spec[0], spec[1]
    kwargs = dict(spec[2]) if len(spec) == 3 and spec[2] is not None else {}
    if not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"reward {name!r}: weight must be a finite number, got {weight!r}")
    return str(name), float(weight), kwargs


def make_reward_fns(
    specs: Sequence[Sequence], token_spec: Any, **shared: Any
) -> Callable[[Mapping[str, jax.Array], Mapping | None], tuple[jax.Array, dict[str, jax.Array]]]:
    """Combine weighted rewards: `combined(batch, params=None) -> (total [N], {name: unweighted [N]})`.

    specs: (name, weight) or (name, weight, kwargs). `shared` options (e.g. `tokenizer=tok`,
    `model_config=cfg`) go to every factory whose signature names them; a spec's own kwargs win.
    A name used twice is reported as `name`, `name_2`, ...
    """
    _register_builtin_rewards()
    built: list[tuple[str, float, RewardFn, int | None]] = []
    seen: dict[str, int] = {}
    for spec in specs:
        name, weight, kwargs = _normalise_spec(spec)
        route = kwargs.pop("on", None)
        if route is not None and route not in ROUTES:
            raise ValueError(f"reward {name!r}: 'on' must be one of {ROUTES}, got {route!r}")
        if name not in IN_GRAPH_REWARDS:
            raise ValueError(f"unknown in-graph reward {name!r}; known: {sorted(IN_GRAPH_REWARDS)}")
        accepted = _accepted_options(IN_GRAPH_REWARDS[name])
        options = {k: v for k, v in shared.items() if k in accepted} | kwargs
        seen[name] = seen.get(name, 0) + 1
        key = name if seen[name] == 1 else f"{name}_{seen[name]}"
        built.append(
            (
                key,
                weight,
                make_reward(name, token_spec, **options),
                None if route is None else ROUTES.index(route),
            )
        )

    def combined(batch: Mapping[str, jax.Array], params: Mapping | None = None):
        n = batch["completion_tokens"].shape[0]
        total = jnp.zeros((n,), jnp.float32)
        per_reward = {}
        for key, weight, fn, route in built:
            value = fn(batch, params).astype(jnp.float32)
            if route is not None:
                if "route" not in batch:
                    raise ValueError(f"reward {key!r} is routed ('on') but the batch has no 'route' array")
                value = jnp.where(batch["route"] == route, value, 0.0)
            per_reward[key] = value
            total = total + weight * value
        return total, per_reward

    return combined
