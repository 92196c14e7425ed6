"""Multi-turn rollouts: the rollout engine decodes until rows end a turn with a tool call, the host runs the
calls, and the observations' tokens are fed into the same rows (docs/ARCHITECTURE.md, "Multi-turn
rollouts"; the engine's side: `slots` module docstring, "Turns"; the tools and environments:
`grpo_jax.envs`).

One RL step's B prompts × G samples, all enqueued into an empty engine and decoded to the end:

    state = enqueue(B prompts)
    repeat:
        state = decode(state)             # until every row with a slot is paused or finished
        paused rows -> their last turn's tokens -> `respond` -> observation tokens (or "the end")
        state = resume(state, observations)
    hand out the B groups: a `Rollout` whose `loss_mask` is 0 on observation tokens

Row b·G + j is sample j of prompt b, as for every sampler. A row is a single token sequence (prompt, turn
1, observation 1, turn 2, ...): its keys stay in its pages between turns, so an observation costs the
forward of its own tokens only. The engine runs on the device; `respond` and the environments on the host,
between decode calls. Single-process only for now: the host reads every row (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import atexit
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax import sampling
from grpo_jax.models import ModelConfig
from grpo_jax.rollout.partial import PartialRollouts

# respond(rows, turns) -> one (observation tokens, end) per row: `turns[i]` is row `rows[i]`'s last turn
# (the tokens it drew since its previous observation, the pause token included).
Responder = Callable[[Sequence[int], Sequence[list[int]]], Sequence[tuple[Sequence[int], bool]]]

_NO_LIMIT = int(np.iinfo(np.int32).max)


def last_turn(tokens: np.ndarray, generated: np.ndarray, length: int) -> list[int]:
    """The tokens of a row's last turn: the trailing run of drawn tokens (`generated` 1) in [0, length)."""
    start = length
    while start > 0 and generated[start - 1]:
        start -= 1
    return [int(i) for i in tokens[start:length]]


class TurnRollouts:
    """The compiled programs of one multi-turn setting and the host loop between them (module docstring).

    pause_id: the token that ends a tool call (`</tool_call>`: one token of the tokenizer); max_turns: the
    model's turns per row (a call in the last one ends the row); observation_len: the most tokens of one
    observation (longer ones are cut). The rest are `sampling.generate`'s settings and the engine's
    (`num_slots`, `page_size`); `prompts_per_step`: B, the prompts of one call.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        *,
        prompts_per_step: int,
        num_samples: int,
        prompt_len: int,
        max_new_tokens: int,
        eos_id: int,
        pause_id: int,
        max_turns: int,
        observation_len: int,
        num_slots: int | None = None,
        page_size: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop_ids: Sequence[int] = (),
        min_new_tokens: int = 0,
        pad_id: int = 0,
        mesh=None,
        check_pages: bool = False,
    ):
        if max_turns < 1:
            raise ValueError(f"multi-turn rollouts: max_turns must be >= 1, got {max_turns}")
        if jax.process_count() > 1:
            raise ValueError(
                "multi-turn rollouts run in one process for now (the host answers every row); "
                f"this run has {jax.process_count()}"
            )
        self.engine = PartialRollouts(
            model_config,
            prompts_per_step=prompts_per_step,
            max_groups=prompts_per_step,
            num_slots=num_slots,
            budget=_NO_LIMIT,
            page_size=page_size,
            prompt_len=prompt_len,
            num_samples=num_samples,
            max_new_tokens=max_new_tokens,
            eos_id=eos_id,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop_ids=stop_ids,
            min_new_tokens=min_new_tokens,
            pad_id=pad_id,
            pause_ids=(int(pause_id),),
            max_turns=max_turns,
            observation_len=observation_len,
            mesh=mesh,
            check_pages=check_pages,
        )
        self.geom = self.engine.geom

    def run(self, params, prompts: Mapping[str, jax.Array], rng, respond: Responder, version=0):
        """B prompts' G multi-turn samples under `params`: prompts {"prompt_tokens", "prompt_mask" [B, P]}
        (left-padded, in the batch layout); rng: the rows' streams, as `sampling.generate`'s; respond: the
        host's answer to paused rows (`Responder`). -> (`sampling.Rollout` with `loss_mask`, turns [N]
        int32: each row's pauses, stats {"decode_calls", "decode_iterations", "respond_time_s"})."""
        engine, geom = self.engine, self.geom
        d, slots_per_shard, g = engine.d, geom.slots, geom.group
        rows_per_shard = engine.target * g
        st = engine.enqueue(engine.init(), params, dict(prompts), rng, version)
        iterations, calls, respond_time_s = 0, 0, 0.0
        while True:
            st, ran = engine.decode(st, params, version, _NO_LIMIT)
            iterations, calls = iterations + int(ran), calls + 1
            paused = np.asarray(jax.device_get(st.paused))  # [D, S]
            if not paused.any():
                break
            items, t, tokens, generated = jax.device_get((st.item, st.t, st.tokens, st.generated))
            where = np.argwhere(paused)  # [(shard, slot)]
            rows = [int(s * rows_per_shard + items[s, k]) for s, k in where]
            turns = [last_turn(tokens[s, items[s, k]], generated[s, items[s, k]], t[s, k]) for s, k in where]
            start = time.monotonic()
            answers = list(respond(rows, turns))
            respond_time_s += time.monotonic() - start
            if len(answers) != len(rows):
                raise ValueError(f"respond answered {len(answers)} of {len(rows)} paused rows")
            width = max(geom.observation_len, 1)
            observations = np.full((d, slots_per_shard, width), geom.pad_id, np.int32)
            lengths = np.zeros((d, slots_per_shard), np.int32)
            end = np.zeros((d, slots_per_shard), bool)
            for (s, k), (observation, finished) in zip(where, answers, strict=True):
                observation = list(observation)[:width]
                observations[s, k, : len(observation)] = observation
                lengths[s, k], end[s, k] = len(observation), bool(finished)
            st = engine.resume(st, observations, lengths, end)
        st, handout = engine.hand_out(st, iterations)
        del st
        stats = {"decode_calls": calls, "decode_iterations": iterations, "respond_time_s": respond_time_s}
        return handout.rollout, handout.stats["turns"], stats


@dataclasses.dataclass
class EnvResponder:
    """A `Responder` backed by an environment per row (`grpo_jax.envs.EnvRunner`): a paused row's turn is
    decoded and stepped in its environment; the observation text is encoded (no BOS) and cut to the
    engine's `observation_len`; an environment that ends the trajectory ends the row. `finish` then steps
    the rows that ended on their own (stop token, length, turn limit) with their last turn, so every row
    gets its environment's final reward (its tool counters are left out: a call cut off by the row's end
    was never answered). rewards [N] and per-call stats accumulate over one rollout."""

    runner: Any  # grpo_jax.envs.EnvRunner
    tokenizer: Any
    stats: dict = dataclasses.field(default_factory=dict)

    def reset(self, examples: Sequence[Mapping[str, Any]]) -> None:
        """New trajectories, one per row (row b·G + j: the example of prompt b)."""
        self.runner.reset(examples)
        self.rewards = np.zeros((len(examples),), np.float32)
        self.stats = {}

    def _text(self, turn: Sequence[int]) -> str:
        eos = self.tokenizer.eos_id
        return self.tokenizer.decode([i for i in turn if i != eos])

    def _step(self, rows: Sequence[int], texts: Sequence[str], *, final: bool = False):
        batch: list[str | None] = [None] * len(self.rewards)
        for row, text in zip(rows, texts, strict=True):
            batch[row] = text
        out = self.runner.step(batch)
        for name, value in out.stats.items():
            if final and name.startswith("tool/"):  # a call cut off by the row's end was never answered
                continue
            self.stats[name] = self.stats.get(name, 0.0) + float(value)
        self.rewards += out.rewards
        if final:  # nor is it paid for (`call_reward` of envs/base.py:ToolEnv)
            self.rewards -= np.array([info.get("call_reward", 0.0) for info in out.infos], np.float32)
        return out

    def __call__(self, rows: Sequence[int], turns: Sequence[list[int]]):
        out = self._step(rows, [self._text(turn) for turn in turns])
        answers = []
        for row in rows:
            observation = out.observations[row] or ""
            tokens = self.tokenizer.encode(observation) if observation else []
            answers.append((tokens, bool(out.dones[row])))
        return answers

    def finish(self, rollout: sampling.Rollout) -> np.ndarray:
        """Steps every row whose environment is still open with its last turn; the rewards [N] float32."""
        open_rows = [int(i) for i in np.flatnonzero(~self.runner.done)]
        if open_rows:
            tokens, loss_mask, lengths = jax.device_get((rollout.tokens, rollout.loss_mask, rollout.lengths))
            texts = [self._text(last_turn(tokens[i], loss_mask[i], int(lengths[i]))) for i in open_rows]
            self._step(open_rows, texts, final=True)
        return self.rewards.copy()


_ROW_MEANS = ("turns/pauses_mean", "turns/observation_tokens_mean", "env/reward_mean")


def merge_turn_stats(rounds: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """`TurnSampler.stats` of several rollouts of one training step (refill rounds) as one step's: the
    counters and seconds (`tool/*`, `env/num_*`, `env/time_s`, `turns/decode_*`, `turns/respond_time_s`,
    `turns/num_trajectories`) summed, the per-row means weighted by each round's trajectories. Keys that
    are not turn stats are left out."""
    rounds = [r for r in rounds if "turns/num_trajectories" in r]
    if not rounds:
        return {}
    weights = np.array([r["turns/num_trajectories"] for r in rounds], np.float64)
    merged = {}
    for key in dict.fromkeys(k for r in rounds for k in r):
        if not key.startswith(("tool/", "env/", "turns/")):
            continue
        values = np.array([r.get(key, 0.0) for r in rounds], np.float64)
        merged[key] = float(values @ weights / weights.sum() if key in _ROW_MEANS else values.sum())
    return merged


def observation_tokens_of(rollout: sampling.Rollout) -> jax.Array:
    """[N] int32: observation tokens per row (in `mask`, not in `loss_mask`)."""
    return jnp.sum((rollout.mask > 0) & (rollout.loss_mask == 0), axis=-1, dtype=jnp.int32)


def single_token_id(tokenizer, text: str, what: str) -> int:
    """The id of `text` where it is one piece of the tokenizer (a user-defined or special token), or where
    the tokenizer encodes it as exactly one token; else a one-line error."""
    piece = tokenizer.token_to_id(text)
    if piece is not None:
        return int(piece)
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        raise ValueError(
            f"{what} {text!r} must be one token of the tokenizer to pause a row on it; it encodes as {ids} "
            "(train the tokenizer with it as a user-defined symbol, or use a tokenizer whose chat template "
            "has it as a special token)"
        )
    return int(ids[0])


class TurnSampler:
    """`sampling.generate`'s signature over multi-turn rollouts with an environment's tools (for the RL
    stages and held-out evaluation): `env_config` (`grpo_jax.envs.EnvConfig`) gives the environment, its
    tool format (whose `call_close` must be one token: the pause token) and `max_tool_turns`;
    `max_observation_tokens` the most tokens one observation feeds. Each call resets one environment per
    row (`examples`: the rows' examples, N = B·G; default empty ones, enough for tools that do not read
    them) and leaves `rewards` [N] (each row's final environment reward), `turns` [N] and `stats` (tool and
    decode counters) for the caller. Programs are compiled once per static setting."""

    takes_examples = True  # callers (the held-out evaluator) pass each row's example for its environment

    def __init__(
        self, env_config, tokenizer, *, max_observation_tokens: int, page_size: int = 16, num_slots=None
    ):
        if max_observation_tokens < 1:
            raise ValueError(f"max_observation_tokens must be >= 1, got {max_observation_tokens}")
        fmt = env_config.tool_format_for(tokenizer)
        self.pause_id = single_token_id(tokenizer, fmt.call_close, f"{env_config.section}'s tool-call end")
        self.max_turns = env_config.max_tool_turns
        self.observation_len = int(max_observation_tokens)
        self.page_size, self.num_slots = page_size, num_slots
        self.runner = env_config.make_runner(tokenizer)
        self.responder = EnvResponder(self.runner, tokenizer)
        self._programs: dict = {}
        self.rewards = self.turns = None
        self.stats: dict = {}
        atexit.register(self.close)

    def __call__(
        self,
        model_config,
        params,
        prompt_tokens,
        prompt_mask,
        rng,
        *,
        num_samples: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        eos_id: int,
        stop_ids: Sequence[int] = (),
        min_new_tokens: int = 0,
        pad_id: int = 0,
        mesh=None,
        examples: Sequence[Mapping[str, Any]] | None = None,
    ) -> sampling.Rollout:
        batch, prompt_len = np.shape(prompt_tokens)
        settings = sampling.static_settings(
            num_samples=num_samples,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            eos_id=eos_id,
            stop_ids=stop_ids,
            min_new_tokens=min_new_tokens,
            pad_id=pad_id,
        )
        key = (model_config, batch, prompt_len, mesh, int(eos_id), tuple(sorted(settings.items())))
        if key not in self._programs:
            self._programs[key] = TurnRollouts(
                model_config,
                prompts_per_step=batch,
                prompt_len=prompt_len,
                pause_id=self.pause_id,
                max_turns=self.max_turns,
                observation_len=self.observation_len,
                num_slots=self.num_slots,
                page_size=self.page_size,
                mesh=mesh,
                eos_id=int(eos_id),
                **settings,
            )
        rows = batch * settings["num_samples"]
        examples = list(examples) if examples is not None else [{} for _ in range(rows)]
        if len(examples) != rows:
            raise ValueError(f"TurnSampler: {len(examples)} examples for {rows} rows")
        self.responder.reset(examples)
        prompts = {"prompt_tokens": prompt_tokens, "prompt_mask": prompt_mask}
        rollout, turns, stats = self._programs[key].run(params, prompts, rng, self.responder)
        self.rewards = self.responder.finish(rollout)
        self.turns = np.asarray(jax.device_get(turns))
        observation = np.asarray(jax.device_get(observation_tokens_of(rollout)))
        self.stats = {
            **self.responder.stats,
            **{f"turns/{k}": float(v) for k, v in stats.items()},
            "turns/num_trajectories": float(rows),
            "turns/pauses_mean": float(self.turns.mean()),
            "turns/observation_tokens_mean": float(observation.mean()),
            "env/reward_mean": float(np.mean(self.rewards)),
        }
        return rollout

    def close(self) -> None:
        """Stops the environment's worker processes."""
        self.runner.close()
