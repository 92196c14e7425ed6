"""Multi-turn rollouts (grpo_jax.rollout.turns, the engine's pauses): a row is the plain engine's up to its
tool call; the observation's tokens follow it in the row (mask 1, loss mask 0, logprobs 0); the tokens
drawn after it have the logprobs of one full forward over the whole row; max_turns and an environment's
end finish a row at its call; no page is leaked; the same rows on a 2x2x2 mesh; and the GRPO loss does not
see observation tokens (its gradient with respect to their old and reference logprobs is 0, and is not
without the loss mask)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_rollout_engine import EOS, PAGE, STOPS, _prompts

from grpo_jax import models, sampling, sharding
from grpo_jax.algorithms import GRPOConfig
from grpo_jax.rollout import turns
from grpo_jax.testing import mesh_2x2x2, tiny_model_config, tiny_params
from grpo_jax.training.grpo_step import grpo_loss

CONFIG = tiny_model_config()
G = 4
LENGTH = 24
OBSERVATION = [50, 51, 52]
SAMPLING = dict(num_samples=G, temperature=1.0, max_new_tokens=LENGTH, eos_id=EOS, stop_ids=STOPS)


@pytest.fixture(scope="module")
def params():
    return tiny_params(CONFIG, seed=3)


@pytest.fixture(scope="module")
def plain(params):
    """The static sampler's rows for the test prompts (what the engine draws without turns)."""
    tokens, mask = _prompts()
    return jax.device_get(sampling.generate(CONFIG, params, tokens, mask, jax.random.key(5), **SAMPLING))


@pytest.fixture(scope="module")
def pause_id(plain):
    """A token the plain rows draw early on several rows (so some rows pause, others do not)."""
    early = [
        int(t)
        for row, n in zip(plain.tokens, plain.lengths)
        for t in row[1 : min(int(n) - 1, LENGTH // 2)]
        if t not in STOPS
    ]
    values, counts = np.unique(early, return_counts=True)
    return int(values[np.argmax(counts)])


def _run(params, pause_id, respond, mesh=None, max_turns=3, **kw):
    tokens, mask = _prompts()
    prompts = {"prompt_tokens": tokens, "prompt_mask": mask}
    if mesh is not None:
        prompts = sharding.shard_batch(prompts, mesh)
    rollouts = turns.TurnRollouts(
        CONFIG,
        prompts_per_step=4,
        prompt_len=6,
        pause_id=pause_id,
        max_turns=max_turns,
        observation_len=4,
        num_slots=5,
        page_size=PAGE,
        mesh=mesh,
        check_pages=True,
        **SAMPLING,
        **kw,
    )
    rollout, row_turns, stats = rollouts.run(params, prompts, jax.random.key(5), respond)
    return jax.device_get(rollout), np.asarray(row_turns), stats


def _first(row, token, n):
    hits = np.flatnonzero(row[:n] == token)
    return int(hits[0]) if hits.size else None


def _answer(rows, turn_tokens, calls):
    calls.append(list(rows))
    return [(OBSERVATION, False) for _ in rows]


@pytest.fixture(scope="module")
def two_turns(params, pause_id):
    calls = []
    return (*_run(params, pause_id, lambda r, t: _answer(r, t, calls)), calls)


def test_a_row_is_the_plain_rows_up_to_its_call_then_the_observation(plain, pause_id, two_turns):
    out, row_turns, _, calls = two_turns
    paused_rows = 0
    for i in range(len(out.tokens)):
        p = _first(plain.tokens[i], pause_id, int(plain.lengths[i]))
        if p is None:  # never called a tool: the plain row exactly
            np.testing.assert_array_equal(out.tokens[i], plain.tokens[i])
            np.testing.assert_array_equal(out.loss_mask[i], plain.mask[i])
            assert row_turns[i] == 0
            continue
        paused_rows += 1
        np.testing.assert_array_equal(out.tokens[i, : p + 1], plain.tokens[i, : p + 1])
        n = min(len(OBSERVATION), LENGTH - p - 1)
        np.testing.assert_array_equal(out.tokens[i, p + 1 : p + 1 + n], OBSERVATION[:n])
        np.testing.assert_array_equal(out.mask[i, p + 1 : p + 1 + n], 1)
        np.testing.assert_array_equal(out.loss_mask[i, p + 1 : p + 1 + n], 0)
        np.testing.assert_array_equal(out.logprobs[i, p + 1 : p + 1 + n], 0.0)
        assert 1 <= row_turns[i] <= 2
    assert paused_rows >= 2 and paused_rows < len(out.tokens)
    assert sum(len(c) for c in calls) == int(row_turns.sum())
    assert (out.loss_mask <= out.mask).all()


def test_tokens_drawn_after_an_observation_have_the_full_forwards_logprobs(params, two_turns):
    out = two_turns[0]
    full = models.completion_logprobs(
        CONFIG, params, out.prompt_tokens, out.prompt_mask, out.tokens, out.mask, temperature=1.0
    )
    drawn = out.loss_mask > 0
    after = drawn & (np.cumsum(out.mask - out.loss_mask, axis=1) > 0)  # drawn after an observation
    assert after.sum() >= 5
    np.testing.assert_allclose(np.asarray(full)[drawn], out.logprobs[drawn], atol=2e-5)


def test_no_page_is_held_or_leaked_after_a_multi_turn_rollout(params, pause_id):
    tokens, mask = _prompts()
    rollouts = turns.TurnRollouts(
        CONFIG,
        prompts_per_step=4,
        prompt_len=6,
        pause_id=pause_id,
        max_turns=3,
        observation_len=4,
        num_slots=5,
        page_size=PAGE,
        check_pages=True,
        **SAMPLING,
    )
    engine = rollouts.engine
    st = engine.enqueue(
        engine.init(), params, {"prompt_tokens": tokens, "prompt_mask": mask}, jax.random.key(5), 0
    )
    st, _ = engine.decode(st, params, 0, 1 << 30)
    assert bool(np.asarray(st.paused).any())
    held = int(np.sum(st.pool.free_count))
    n = np.asarray(st.paused).shape
    st = engine.resume(st, np.full((*n, 4), 50, np.int32), np.full(n, 2, np.int32))
    while True:
        st, _ = engine.decode(st, params, 0, 1 << 30)
        if not np.asarray(st.paused).any():
            break
        st = engine.resume(st, np.zeros((*n, 4), np.int32), np.zeros(n, np.int32))
    assert int(np.sum(st.page_errors)) == 0 and int(np.sum(st.underflows)) == 0
    st, handout = engine.hand_out(st)
    assert int(handout.stats["pages_in_use"]) == 0
    assert int(np.sum(st.pool.free_count)) == rollouts.geom.num_pages > held


def test_max_turns_one_ends_a_row_at_its_call_truncated(params, plain, pause_id):
    calls = []
    out, row_turns, _ = _run(params, pause_id, lambda r, t: _answer(r, t, calls), max_turns=1)
    assert calls == [] and (row_turns == 0).all()
    for i in range(len(out.tokens)):
        p = _first(plain.tokens[i], pause_id, int(plain.lengths[i]))
        if p is not None:
            assert int(out.lengths[i]) == p + 1 and bool(out.truncated[i])
            np.testing.assert_array_equal(out.tokens[i, : p + 1], plain.tokens[i, : p + 1])
            assert (out.mask[i, p + 1 :] == 0).all()


def test_an_environment_that_ends_the_trajectory_ends_the_row_not_truncated(params, plain, pause_id):
    out, row_turns, _ = _run(params, pause_id, lambda rows, t: [([], True) for _ in rows])
    ended = 0
    for i in range(len(out.tokens)):
        p = _first(plain.tokens[i], pause_id, int(plain.lengths[i]))
        if p is not None:
            ended += 1
            assert int(out.lengths[i]) == p + 1 and not bool(out.truncated[i])
            assert row_turns[i] == 1 and (out.mask[i, p + 1 :] == 0).all()
    assert ended >= 2


def test_the_same_rows_on_a_2x2x2_mesh(params, pause_id, two_turns):
    out = two_turns[0]
    calls = []
    got, got_turns, _ = _run(params, pause_id, lambda r, t: _answer(r, t, calls), mesh=mesh_2x2x2())
    np.testing.assert_array_equal(got.tokens, out.tokens)
    np.testing.assert_array_equal(got.loss_mask, out.loss_mask)
    np.testing.assert_array_equal(got_turns, two_turns[1])
    np.testing.assert_allclose(got.logprobs, out.logprobs, atol=2e-5)


@pytest.mark.parametrize("with_loss_mask", [True, False])
def test_the_grpo_loss_does_not_see_observation_tokens(params, two_turns, with_loss_mask):
    """d loss / d (old and reference logprobs) is 0 on observation tokens with the loss mask; without it
    (the switch off: the observation counted as the policy's) it is not."""
    out = two_turns[0]
    n = out.tokens.shape[0]
    mb = {
        "prompt_tokens": out.prompt_tokens,
        "prompt_mask": out.prompt_mask,
        "completion_tokens": out.tokens,
        "completion_mask": out.mask,
        "advantages": jnp.linspace(-1.0, 1.0, n),
        "sample_weight": jnp.ones(n),
    }
    if with_loss_mask:
        mb["loss_mask"] = out.loss_mask
    grpo = GRPOConfig(num_generations=G, kl_coef=0.1)

    def loss(old, ref):
        return grpo_loss(
            params, {**mb, "old_logprobs": old, "ref_logprobs": ref}, grpo=grpo, model_config=CONFIG
        )[0]

    perturbed = jnp.asarray(out.logprobs) - 0.1
    d_old, d_ref = jax.jit(jax.grad(loss, argnums=(0, 1)))(perturbed, perturbed)
    observation = (out.mask > 0) & (out.loss_mask == 0)
    drawn = out.loss_mask > 0
    assert float(jnp.max(jnp.abs(d_old[drawn]))) > 0 and float(jnp.max(jnp.abs(d_ref[drawn]))) > 0
    observed = float(jnp.max(jnp.abs(d_old[observation]))) + float(jnp.max(jnp.abs(d_ref[observation])))
    assert (observed == 0.0) == with_loss_mask


@pytest.mark.parametrize("with_loss_mask", [True, False])
def test_the_ppo_losses_do_not_see_observation_tokens(params, two_turns, with_loss_mask):
    """PPO's policy loss (d/d old logprobs) and critic loss (d/d returns) are 0 on observation tokens with
    the loss mask, not without it. (GAE across the holes: test_losses.)"""
    from grpo_jax.algorithms import PPOConfig
    from grpo_jax.training.ppo_step import critic_loss, ppo_policy_loss

    out = two_turns[0]
    n, length = out.tokens.shape
    mb = {
        "prompt_tokens": out.prompt_tokens,
        "prompt_mask": out.prompt_mask,
        "completion_tokens": out.tokens,
        "completion_mask": out.mask,
        "advantages": jnp.broadcast_to(jnp.linspace(-1.0, 1.0, length), (n, length)),
        "old_values": jnp.zeros((n, length)),
    }
    if with_loss_mask:
        mb["loss_mask"] = out.loss_mask
    ppo = PPOConfig()
    value_params = {
        "backbone": params,
        "head": {"kernel": jnp.full(CONFIG.hidden_size, 0.1), "bias": jnp.zeros(())},
    }

    def policy(old):
        return ppo_policy_loss(params, {**mb, "old_logprobs": old}, ppo=ppo, model_config=CONFIG)[0]

    def critic(returns):
        return critic_loss(value_params, {**mb, "returns": returns}, ppo=ppo, model_config=CONFIG)[0]

    d_old = jax.jit(jax.grad(policy))(jnp.asarray(out.logprobs) - 0.1)
    d_returns = jax.jit(jax.grad(critic))(jnp.ones((n, length)))
    observation = (out.mask > 0) & (out.loss_mask == 0)
    drawn = out.loss_mask > 0
    assert float(jnp.max(jnp.abs(d_old[drawn]))) > 0 and float(jnp.max(jnp.abs(d_returns[drawn]))) > 0
    observed = float(jnp.max(jnp.abs(d_old[observation]))) + float(jnp.max(jnp.abs(d_returns[observation])))
    assert (observed == 0.0) == with_loss_mask


def test_turn_sampler_answers_paused_rows_with_the_calculator_environment():
    """End to end on the host side: rows that end a turn with `</tool_call>` get the calculator
    environment's observation (here an error for a malformed call: the random model writes no JSON) as
    their next tokens, the environment's stats count the calls, and every row gets a final reward."""
    from grpo_jax.envs import EnvConfig, ToolFormat, format_call, format_observation
    from grpo_jax.tokenizers import R1_SPECIAL_SYMBOLS, train_sentencepiece

    fmt = ToolFormat()
    tags = (fmt.call_open, fmt.call_close, fmt.response_open.strip(), fmt.response_close.strip())
    texts = [format_call("calculator", {"expression": f"{a}*{a + 3}"}, fmt) for a in range(40)]
    texts += [format_observation(str(a * 7), fmt) + f"<answer>{a}</answer>" for a in range(40)]
    tokenizer = train_sentencepiece(texts, vocab_size=48, user_defined_symbols=R1_SPECIAL_SYMBOLS + tags)
    env = EnvConfig(env="calculator", max_tool_turns=3, max_observation_tokens=6, env_workers=0)
    sampler = turns.TurnSampler(env, tokenizer, max_observation_tokens=6, page_size=PAGE, num_slots=6)
    config = tiny_model_config(vocab_size=tokenizer.vocab_size)
    pause = tokenizer.token_to_id(fmt.call_close)
    assert sampler.pause_id == pause
    tokens, mask = _prompts()
    tokens = np.where(mask > 0, tokens % tokenizer.vocab_size, 0)
    try:
        out = sampler(
            config,
            tiny_params(config, seed=1),
            tokens,
            mask,
            jax.random.key(0),
            num_samples=4,
            max_new_tokens=32,
            temperature=1.0,
            eos_id=tokenizer.eos_id,
            examples=[{"prompt": "", "answer": "1"} for _ in range(16)],
        )
    finally:
        sampler.close()
    out = jax.device_get(out)
    called = np.flatnonzero(sampler.turns)
    # Each pause is one environment step: a call (answered) or a turn with no parseable call (the final
    # answer: the environment ends the row there, nothing more is written).
    assert called.size >= 2 and 1 <= sampler.stats["tool/num_calls"] <= sampler.turns.sum()
    assert sampler.stats["env/num_steps"] >= sampler.turns.sum() and sampler.rewards.shape == (16,)
    answered = 0
    for i in called:
        p = int(np.flatnonzero(out.tokens[i] == pause)[0])
        after = slice(p + 1, None)
        observation = out.tokens[i, after][(out.mask[i, after] > 0) & (out.loss_mask[i, after] == 0)]
        if observation.size == 0:
            assert (out.mask[i, after] == 0).all()  # ended by its environment at the call
            continue
        answered += 1
        text = tokenizer.decode(observation.tolist())
        # the calculator's error message, cut to the 6 observation tokens the setting allows
        assert observation.size <= 6 and text.startswith(fmt.observation_prefix + fmt.response_open + "err")
    observed = (out.mask > 0) & (out.loss_mask == 0)
    segments = int(np.sum(observed[:, 1:] & ~observed[:, :-1]) + np.sum(observed[:, 0]))
    assert answered >= 1 and segments == sampler.stats["tool/num_calls"]  # one observation per answered call


def test_turn_stats_of_refill_rounds_merge_into_one_step():
    """Counters and seconds of a step's rollouts (refill rounds) add up; per-row means are weighted by
    each round's trajectories; other metrics are not turn stats."""
    first = {
        "tool/num_calls": 3.0,
        "env/time_s": 0.5,
        "turns/respond_time_s": 0.25,
        "turns/num_trajectories": 4.0,
        "turns/pauses_mean": 1.0,
        "env/reward_mean": 0.5,
        "reward/mean": 9.0,
    }
    second = {**first, "tool/num_calls": 1.0, "turns/num_trajectories": 12.0, "turns/pauses_mean": 0.0}
    merged = turns.merge_turn_stats([first, second, {"reward/mean": 1.0}])
    assert merged == {
        "tool/num_calls": 4.0,
        "env/time_s": 1.0,
        "turns/respond_time_s": 0.5,
        "turns/num_trajectories": 16.0,
        "turns/pauses_mean": 0.25,
        "env/reward_mean": 0.5,
    }
    assert turns.merge_turn_stats([{"reward/mean": 1.0}]) == {}


def test_the_evaluator_gives_a_multi_turn_sampler_each_rows_example():
    """Held-out evaluation with tools: each row's environment starts on its own problem (row b·k + j: the
    example of prompt b, the last chunk's fill included), so a final turn can be scored; a plain sampler
    gets no `examples`."""
    from grpo_jax.data.tasks import ArithmeticTask
    from grpo_jax.testing import tiny_tokenizer
    from grpo_jax.training.evaluator import Evaluator

    tokenizer = tiny_tokenizer()
    examples = ArithmeticTask(seed=0).split("test", 5)
    seen = []

    def fake_generate(model_config, params, prompt_tokens, prompt_mask, rng, *, num_samples, **kwargs):
        seen.append(kwargs.get("examples"))
        rows = len(prompt_tokens) * num_samples
        return types.SimpleNamespace(tokens=np.zeros((rows, 2), np.int32), mask=np.zeros((rows, 2), np.int32))

    def evaluator(generate_fn):
        return Evaluator(
            None,
            tokenizer,
            examples,
            template="plain",
            max_prompt_len=12,
            max_new_tokens=2,
            batch_size=4,
            k=2,
            generate_fn=generate_fn,
        )

    assert turns.TurnSampler.takes_examples  # the multi-turn sampler asks for them
    evaluator(fake_generate)(None, jax.random.key(0))
    assert seen == [None] * 4  # greedy and k samples, two chunks each
    fake_generate.takes_examples = True
    seen.clear()
    evaluator(fake_generate)(None, jax.random.key(0))
    prompts = [[e["prompt"] for e in rows] for rows in seen]
    fill = [examples[i % 5]["prompt"] for i in range(8)]
    assert prompts[0] == fill[:4] and prompts[1] == fill[4:]  # greedy: one row per prompt
    assert prompts[2] == [p for p in fill[:4] for _ in range(2)] and prompts[3] == [
        p for p in fill[4:] for _ in range(2)
    ]


def test_a_call_cut_off_by_the_rows_end_earns_no_call_reward():
    """`call_reward` pays a call the model sees answered; `EnvResponder.finish` steps a row that ended on
    a call (its length limit) only to score it, so that call is neither counted nor paid."""
    import functools

    from grpo_jax.envs import EnvRunner, make_env
    from grpo_jax.testing import tiny_tokenizer

    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>'
    factory = functools.partial(make_env, "calculator", call_reward=0.5, describe_tools=False)
    runner = EnvRunner(factory, timeout_s=5.0, num_workers=0)
    try:
        responder = turns.EnvResponder(runner, tiny_tokenizer())
        for final, want in ((False, 0.5), (True, 0.0)):
            responder.reset([{"prompt": "6*7", "answer": "42"}])
            responder._step([0], [call], final=final)
            assert responder.rewards.tolist() == [want]
    finally:
        runner.close()
