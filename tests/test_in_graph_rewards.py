"""In-graph rule rewards on hand-made token sequences, eagerly and jitted on a sharded batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from grpo_jax.rewards import in_graph
from grpo_jax.rewards.registry import IN_GRAPH_REWARDS, make_reward, make_reward_fns
from grpo_jax.rewards.vocabulary import TokenSpec, language_vocab_mask, vocabulary_texts

VOCAB = [
    "<pad>", "</s>", "<think>", "</think>", "<answer>", "</answer>", "▁", "<0x0A>",
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
    "▁7", "-", "▁-", "12", "▁the", "▁cat", "é", "中", "文字", "▁Привет", ",", ".", "+", "<unk>", "a中",
]  # fmt: skip


class FakeTokenizer:
    """The tokenizer protocol the rewards use, over a fixed piece list."""

    def __init__(self, pieces, eos="</s>", pad="<pad>"):
        self.pieces = list(pieces)
        self.index = {p: i for i, p in enumerate(self.pieces)}
        self.eos_id, self.pad_id = self.index[eos], self.index[pad]

    @property
    def vocab_size(self):
        return len(self.pieces)

    def token_to_id(self, piece):
        return self.index.get(piece)

    def id_to_piece(self, i):
        return self.pieces[i]


TOK = FakeTokenizer(VOCAB)
SPEC = TokenSpec.from_tokenizer(TOK)
ID = TOK.index


def ids(text: str) -> list[int]:
    return [ID[p] for p in text.split()]


def make_batch(completions, answers, length=16, answer_len=6, truncated=None):
    """Right-pad completions (piece strings, "</s>" written explicitly) and gold answers into a batch."""
    n = len(completions)
    tokens = np.zeros((n, length), np.int32)
    mask = np.zeros((n, length), np.int32)
    gold = np.zeros((n, answer_len), np.int32)
    gold_mask = np.zeros((n, answer_len), np.int32)
    for i, (text, answer) in enumerate(zip(completions, answers, strict=True)):
        c, a = ids(text), ids(answer)
        tokens[i, : len(c)], mask[i, : len(c)] = c, 1
        gold[i, : len(a)], gold_mask[i, : len(a)] = a, 1
    if truncated is None:
        truncated = [ID["</s>"] not in ids(t) for t in completions]
    prompt = np.full((n, 3), ID["▁the"], np.int32)
    return {
        "completion_tokens": jnp.asarray(tokens),
        "completion_mask": jnp.asarray(mask),
        "truncated": jnp.asarray(truncated, bool),
        "answer_tokens": jnp.asarray(gold),
        "answer_mask": jnp.asarray(gold_mask),
        "prompt_tokens": jnp.asarray(prompt),
        "prompt_mask": jnp.ones((n, 3), jnp.int32),
    }


# ---------------------------------------------------------------- TokenSpec and vocabulary masks


def test_token_spec_from_tokenizer():
    assert (SPEC.think_open, SPEC.think_close, SPEC.answer_open, SPEC.answer_close) == (2, 3, 4, 5)
    assert SPEC.stop_ids == (1,) and SPEC.pad_id == 0 and SPEC.vocab_size == len(VOCAB)
    assert SPEC.whitespace_ids == (ID["▁"], ID["<0x0A>"])
    assert SPEC.digit_ids == tuple(range(8, 18))
    assert SPEC.minus_id == ID["-"] and SPEC.minus_ids == (ID["-"], ID["▁-"])
    assert dict(SPEC.number_pieces)[ID["▁7"]] == "7" and dict(SPEC.number_pieces)[ID["12"]] == "12"
    assert len(SPEC.number_pieces) == 12
    hash(SPEC)
    with pytest.raises(ValueError, match="<answer>"):
        TokenSpec.from_tokenizer(FakeTokenizer([p for p in VOCAB if p != "<answer>"]))


def test_byte_level_vocabulary_is_decoded():
    pieces = ["<|endoftext|>", "<think>", "</think>", "<answer>", "</answer>", "Ġ", "Ċ", "Ġthe", "ä¸Ń", "Ġ7"]
    tok = FakeTokenizer(pieces, eos="<|endoftext|>", pad="<|endoftext|>")
    assert vocabulary_texts(tok)[5:] == [" ", "\n", " the", "中", " 7"]
    spec = TokenSpec.from_tokenizer(tok)
    assert spec.whitespace_ids == (5, 6) and spec.number_pieces == ((9, "7"),)
    assert language_vocab_mask(tok, "cjk").is_target.tolist() == [False] * 8 + [True, False]


def test_real_sentencepiece_tokenizer_end_to_end():
    from grpo_jax.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    spec = TokenSpec.from_tokenizer(tok)
    assert spec.whitespace_ids == (tok.token_to_id("▁"),) and spec.stop_ids == (tok.eos_id,)
    texts = [
        "<think> the carry </think> <answer> 81 </answer>",
        "<think> the </think> <answer> 081 </answer>",
    ]
    encoded = [tok.encode(t, add_eos=True) for t in texts]
    gold = tok.encode("81")
    batch = {
        "completion_tokens": jnp.asarray([e + [tok.pad_id] * (24 - len(e)) for e in encoded], jnp.int32),
        "completion_mask": jnp.asarray([[1] * len(e) + [0] * (24 - len(e)) for e in encoded], jnp.int32),
        "truncated": jnp.zeros((2,), bool),
        "answer_tokens": jnp.asarray([gold, gold], jnp.int32),
        "answer_mask": jnp.ones((2, len(gold)), jnp.int32),
    }
    combined = make_reward_fns(
        [("format", 1.0), ("accuracy", 1.0), ("accuracy_numeric", 1.0), ("language_consistency", 1.0)],
        spec,
        tokenizer=tok,
    )
    _, parts = jax.jit(combined)(batch, None)
    np.testing.assert_array_equal(parts["format"], [1.0, 1.0])
    np.testing.assert_array_equal(parts["accuracy"], [1.0, 0.0])
    np.testing.assert_array_equal(parts["accuracy_numeric"], [1.0, 1.0])
    np.testing.assert_array_equal(parts["language_consistency"], [1.0, 1.0])


def test_language_vocab_mask_classes():
    latin, cjk = language_vocab_mask(TOK, "latin"), language_vocab_mask(TOK, "cjk")
    countable = {p for p, c in zip(VOCAB, latin.is_countable, strict=True) if c}
    assert countable == {"▁the", "▁cat", "é", "中", "文字", "▁Привет", "a中"}
    assert {p for p, t in zip(VOCAB, latin.is_target, strict=True) if t} == {"▁the", "▁cat", "é"}
    assert {p for p, t in zip(VOCAB, cjk.is_target, strict=True) if t} == {"中", "文字", "a中"}
    with pytest.raises(ValueError, match="latin"):
        language_vocab_mask(TOK, "greek")


# ---------------------------------------------------------------- format

FORMAT_CASES = [
    # (completion, format, format(require_stop=False), format_partial)
    ("<think> ▁the ▁cat </think> ▁ <answer> 4 2 </answer> </s>", 1.0, 1.0, 1.0),
    ("▁ <0x0A> <think> ▁the </think> <0x0A> <answer> 4 </answer> <0x0A> ▁ </s>", 1.0, 1.0, 1.0),
    ("<think> </think> <answer> </answer> </s>", 1.0, 1.0, 1.0),
    ("<think> ▁the <answer> 4 </answer> </s>", 0.0, 0.0, 0.75),
    ("<answer> 4 </answer> <think> ▁the </think> </s>", 0.0, 0.0, 0.0),
    ("</think> <think> <answer> 4 </answer> </s>", 0.0, 0.0, 0.5),
    ("<think> ▁the </think> <think> </think> <answer> 4 </answer> </s>", 0.0, 0.0, 0.5),
    ("<think> ▁the </think> <answer> 4 </answer> <answer> </s>", 0.0, 0.0, 0.75),
    ("▁the <think> ▁cat </think> <answer> 4 </answer> </s>", 0.0, 0.0, 1.0),
    ("<think> ▁cat </think> ▁the <answer> 4 </answer> </s>", 0.0, 0.0, 1.0),
    ("<think> ▁cat </think> <answer> 4 </answer> . </s>", 0.0, 0.0, 1.0),
    ("<think> ▁cat </think> <answer> 4 </answer>", 0.0, 1.0, 1.0),
    ("<think> ▁cat </think> <answer> 4 </answer> ▁", 0.0, 1.0, 1.0),
    ("▁the ▁cat </s>", 0.0, 0.0, 0.0),
]


def test_format_rewards():
    batch = make_batch([c[0] for c in FORMAT_CASES], ["4"] * len(FORMAT_CASES))
    np.testing.assert_array_equal(make_reward("format", SPEC)(batch), [c[1] for c in FORMAT_CASES])
    strict_off = make_reward("format", SPEC, require_stop=False)(batch)
    np.testing.assert_array_equal(strict_off, [c[2] for c in FORMAT_CASES])
    np.testing.assert_array_equal(make_reward("format_partial", SPEC)(batch), [c[3] for c in FORMAT_CASES])


def test_format_trusts_truncated_flag():
    text = "<think> </think> <answer> 4 </answer> </s>"
    batch = make_batch([text, text], ["4", "4"], truncated=[False, True])
    np.testing.assert_array_equal(in_graph.format_reward(batch, SPEC), [1.0, 0.0])


# ---------------------------------------------------------------- accuracy (token match and numeric)

ACCURACY_CASES = [
    # (completion, gold, accuracy, accuracy_numeric)
    ("<think> </think> <answer> 4 2 </answer> </s>", "4 2", 1.0, 1.0),
    ("<think> </think> <answer> ▁ 4 <0x0A> 2 ▁ </answer> </s>", "▁ 4 2", 1.0, 1.0),
    ("<answer> 4 2 </answer> <answer> 9 </answer> </s>", "4 2", 1.0, 1.0),
    ("<answer> 4 3 </answer> </s>", "4 2", 0.0, 0.0),
    ("<answer> 4 </answer> </s>", "4 2", 0.0, 0.0),
    ("<answer> 4 2 2 </answer> </s>", "4 2", 0.0, 0.0),
    ("<answer> </answer> </s>", "4 2", 0.0, 0.0),
    ("<answer> ▁ </answer> </s>", "▁", 0.0, 0.0),
    ("<answer> 4 2 </s>", "4 2", 0.0, 0.0),
    ("</answer> 4 2 <answer> </s>", "4 2", 0.0, 0.0),
    ("<answer> 4 2 </answer>", "4 2", 1.0, 1.0),
    ("<answer> 0 0 7 </answer> </s>", "7", 0.0, 1.0),
    ("<answer> ▁7 </answer> </s>", "7", 0.0, 1.0),
    ("<answer> - 3 </answer> </s>", "3", 0.0, 0.0),
    ("<answer> 3 </answer> </s>", "- 3", 0.0, 0.0),
    ("<answer> ▁- 3 </answer> </s>", "- 3", 0.0, 1.0),
    ("<answer> - 0 </answer> </s>", "0", 0.0, 1.0),
    ("<answer> 0 0 </answer> </s>", "0", 0.0, 1.0),
    ("<answer> 12 3 </answer> </s>", "1 2 3", 0.0, 1.0),
    ("<answer> 4 ▁the </answer> </s>", "4", 0.0, 0.0),
    ("<answer> 3 - 4 </answer> </s>", "3", 0.0, 0.0),
    ("<answer> - - 3 </answer> </s>", "- 3", 0.0, 0.0),
    ("<answer> - </answer> </s>", "0", 0.0, 0.0),
    ("<answer> ▁the </answer> </s>", "▁the", 1.0, 0.0),
]


def test_accuracy_rewards():
    batch = make_batch([c[0] for c in ACCURACY_CASES], [c[1] for c in ACCURACY_CASES])
    np.testing.assert_array_equal(make_reward("accuracy", SPEC)(batch), [c[2] for c in ACCURACY_CASES])
    np.testing.assert_array_equal(
        make_reward("accuracy_numeric", SPEC)(batch), [c[3] for c in ACCURACY_CASES]
    )


def test_accuracy_numeric_long_numbers_do_not_overflow():
    ones = " ".join(["1"] * 25)
    batch = make_batch(
        [
            f"<answer> {ones} </answer> </s>",
            f"<answer> 0 {ones} </answer> </s>",
            f"<answer> {ones} </answer> </s>",
        ],
        [ones, ones, " ".join(["1"] * 24)],
        length=32,
        answer_len=26,
    )
    np.testing.assert_array_equal(make_reward("accuracy_numeric", SPEC)(batch), [1.0, 1.0, 0.0])


def test_compact_is_stable_and_static_shape():
    values = jnp.array([[5, 6, 7, 8], [1, 2, 3, 4]])
    keep = jnp.array([[False, True, False, True], [True, True, True, True]])
    out, count = in_graph.compact(values, keep, width=3)
    np.testing.assert_array_equal(out, [[6, 8, -1], [1, 2, 3]])
    np.testing.assert_array_equal(count, [2, 4])


# ---------------------------------------------------------------- language consistency

LANGUAGE_CASES = [
    # (completion, latin share, cjk share)
    ("<think> ▁the ▁cat 中 4 , </think> <answer> 4 </answer> </s>", 2 / 3, 1 / 3),
    ("<think> 中 文字 ▁the a中 </think> </s>", 1 / 4, 3 / 4),
    ("<think> ▁Привет é </think> </s>", 1 / 2, 0.0),
    ("<think> 4 , + </think> </s>", 0.0, 0.0),
    ("▁the ▁cat </s>", 0.0, 0.0),
    ("<think> ▁the ▁cat", 0.0, 0.0),
    ("▁cat <think> ▁the </think> ▁cat </s>", 1.0, 0.0),
]


def test_language_consistency():
    batch = make_batch([c[0] for c in LANGUAGE_CASES], ["4"] * len(LANGUAGE_CASES))
    latin = make_reward("language_consistency", SPEC, tokenizer=TOK)(batch)
    cjk = make_reward("language_consistency", SPEC, vocab_mask=language_vocab_mask(TOK, "cjk"))(batch)
    np.testing.assert_allclose(latin, [c[1] for c in LANGUAGE_CASES], rtol=1e-6)
    np.testing.assert_allclose(cjk, [c[2] for c in LANGUAGE_CASES], rtol=1e-6)
    with pytest.raises(ValueError, match="tokenizer"):
        make_reward("language_consistency", SPEC)


# ---------------------------------------------------------------- length shaping and toy reward


def _batch_of_lengths(lengths, length=12):
    return make_batch(
        [" ".join(["▁the"] * (n - 1) + ["</s>"]) for n in lengths], ["4"] * len(lengths), length
    )


def test_overlong_three_regions():
    batch = _batch_of_lengths([5, 6, 7, 8, 10, 11])  # L_max=10, L_cache=4: soft zone (6, 10]
    reward = make_reward("overlong", SPEC, max_len=10, cache_len=4)(batch)
    np.testing.assert_allclose(reward, [0.0, 0.0, -0.25, -0.5, -1.0, -1.0], rtol=1e-6)
    with pytest.raises(ValueError, match="cache_len"):
        make_reward("overlong", SPEC, max_len=10, cache_len=11)


def test_length_penalty_and_contains_token():
    batch = _batch_of_lengths([4, 8])
    np.testing.assert_allclose(make_reward("length_penalty", SPEC, max_len=10, coef=0.5)(batch), [-0.2, -0.4])
    batch = make_batch(["▁the ▁cat </s>", "▁the </s>", "▁the"], ["4"] * 3)
    np.testing.assert_array_equal(
        make_reward("contains_token", SPEC, token_id=ID["▁cat"])(batch), [1.0, 0.0, 0.0]
    )
    np.testing.assert_array_equal(
        make_reward("contains_token", SPEC, token_id=ID["</s>"])(batch), [1.0, 1.0, 0.0]
    )


# ---------------------------------------------------------------- registry, combination, sharded jit

ALL_RULE_SPECS = [
    ("format", 0.5),
    ("format_partial", 0.25),
    ("accuracy", 1.0),
    ("accuracy_numeric", 2.0),
    ("language_consistency", 0.125, {"language": "latin"}),
    ("overlong", 1.0, {"max_len": 14, "cache_len": 4}),
    ("length_penalty", 1.0, {"max_len": 16, "coef": 0.5}),
    ("contains_token", 1.0, {"token_id": ID["▁cat"]}),
    ("contains_token", 3.0, {"token_id": ID["</s>"]}),
]

MIXED_COMPLETIONS = [
    ("<think> ▁the ▁cat </think> ▁ <answer> 4 2 </answer> </s>", "4 2"),
    ("<think> ▁the 中 </think> <answer> 0 4 2 </answer> </s>", "4 2"),
    ("<answer> 4 2 </answer> <think> </think> </s>", "4 2"),
    ("<think> ▁cat ▁cat ▁cat ▁cat ▁cat ▁cat ▁cat ▁cat ▁cat </think> <answer> 1", "1"),
    ("<think> </think> <answer> ▁7 </answer> </s>", "7"),
    ("▁the <think> </think> <answer> - 3 </answer> </s>", "- 3"),
    ("<think> ▁the </think> <answer> </answer> </s>", "5"),
    ("</s>", "5"),
]


def test_combined_weights_and_names():
    batch = make_batch(*zip(*MIXED_COMPLETIONS, strict=True))
    combined = make_reward_fns(ALL_RULE_SPECS, SPEC, tokenizer=TOK, model_config=None)
    total, per_reward = combined(batch)
    assert list(per_reward) == [
        "format", "format_partial", "accuracy", "accuracy_numeric", "language_consistency",
        "overlong", "length_penalty", "contains_token", "contains_token_2",
    ]  # fmt: skip
    np.testing.assert_array_equal(per_reward["format"], [1, 1, 0, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(per_reward["accuracy"], [1, 0, 1, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(per_reward["accuracy_numeric"], [1, 1, 1, 0, 1, 1, 0, 0])
    np.testing.assert_allclose(per_reward["language_consistency"], [1, 0.5, 0, 1, 0, 0, 1, 0])
    np.testing.assert_allclose(per_reward["overlong"], [0, 0, 0, -0.75, 0, 0, 0, 0])
    weights = [spec[1] for spec in ALL_RULE_SPECS]
    expected = sum(w * np.asarray(v) for w, v in zip(weights, per_reward.values(), strict=True))
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    np.testing.assert_allclose(total[0], 0.5 + 0.25 + 1 + 2 + 0.125 - 0.5 * 10 / 16 + 1 + 3, rtol=1e-6)


def test_registry_errors():
    assert {"format", "accuracy", "overlong", "reward_model"} <= set(IN_GRAPH_REWARDS)
    with pytest.raises(ValueError, match="known: .*'accuracy'"):
        make_reward("acuracy", SPEC)
    with pytest.raises(ValueError, match="known"):
        make_reward_fns([("nope", 1.0)], SPEC)
    with pytest.raises(ValueError, match="unknown option"):
        make_reward("format", SPEC, strict=True)
    with pytest.raises(ValueError, match="max_len"):
        make_reward("overlong", SPEC)
    with pytest.raises(ValueError, match="weight"):
        make_reward_fns([("format", "high")], SPEC)


def test_jit_on_sharded_batch_matches_eager():
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    batch = make_batch(*zip(*MIXED_COMPLETIONS, strict=True))
    sharded = jax.device_put(batch, NamedSharding(mesh, P(("data", "fsdp"))))
    assert sharded["completion_tokens"].sharding.spec == P(("data", "fsdp"))
    combined = make_reward_fns(ALL_RULE_SPECS, SPEC, tokenizer=TOK)
    eager_total, eager_parts = combined(batch)
    jitted_total, jitted_parts = jax.jit(combined)(sharded, None)
    np.testing.assert_allclose(jitted_total, eager_total, rtol=1e-6)
    for name, value in eager_parts.items():
        np.testing.assert_allclose(jitted_parts[name], value, rtol=1e-6, err_msg=name)
