"""In-graph R1 rewards with a byte-level BPE tokenizer that splits the tags into several tokens: the
verdicts must equal the host rewards' on the decoded text (`r1_format`, `math_accuracy`)."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.rewards.host import math_accuracy_reward, r1_format_reward
from grpo_jax.rewards.registry import make_reward, make_reward_fns
from grpo_jax.rewards.vocabulary import R1_TAGS, TokenSpec, vocabulary_texts
from grpo_jax.tokenizers import load_tokenizer

tokenizers = pytest.importorskip("tokenizers")

# Qwen2's pre-tokenizer: "<answer" is one word, and runs of punctuation with their newlines (">\n", ".</",
# "><", ">-") or a letter run after one punctuation mark (">The") can become one piece.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def _training_texts():
    texts = []
    for i in range(60):
        texts += [
            f"<think>\nWe add {i} and {i + 3}.\n</think>\n<answer>\n{2 * i + 3}\n</answer>",
            f" <think> so {i} times 2 </think> <answer> {2 * i} </answer>",
            f"<think>step {i}.</think><answer>-{i}.</answer>",
            f"text <answer>{i}</answer>. The end",
        ]
    return texts


@pytest.fixture(scope="module", params=["gpt2", "qwen2", "qwen3"])
def bpe(request, tmp_path_factory):
    """(tokenizer, TokenSpec): a byte-level BPE trained in-process WITHOUT the tags as special tokens;
    "qwen3" then adds <think> and </think> as tokens (as Qwen3 does), leaving the answer tags split."""
    pre_tokenizers = tokenizers.pre_tokenizers
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    if request.param in ("qwen2", "qwen3"):
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_texts(), trainer=trainer)
    if request.param == "qwen3":
        tok.add_tokens(["<think>", "</think>"])
    directory = tmp_path_factory.mktemp(f"bpe_{request.param}")
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    loaded = load_tokenizer(directory)
    return loaded, TokenSpec.from_tokenizer(loaded)


def _reward(name, spec, **options):
    """A registered in-graph reward, jitted (as in the GRPO step; also faster than eager here)."""
    return jax.jit(make_reward(name, spec, **options))


def _pieces(tok, text):
    texts = vocabulary_texts(tok)
    return [texts[i] for i in tok.encode(text)]


def _batch(tok, completions, answers=None, *, stop=True, length=48):
    """Each completion (text, encoded + EOS when `stop`; or a list of ids, taken as is) and its gold
    answer, in a right-padded batch."""
    n = len(completions)
    tokens = np.full((n, length), tok.pad_id, np.int32)
    mask = np.zeros((n, length), np.int32)
    gold = np.full((n, 8), tok.pad_id, np.int32)
    gold_mask = np.zeros((n, 8), np.int32)
    for i, completion in enumerate(completions):
        ids = tok.encode(completion, add_eos=stop) if isinstance(completion, str) else completion
        assert len(ids) <= length, completion
        tokens[i, : len(ids)], mask[i, : len(ids)] = ids, 1
        answer = tok.encode(answers[i] if answers else "0")
        gold[i, : len(answer)], gold_mask[i, : len(answer)] = answer, 1
    return {
        "completion_tokens": jnp.asarray(tokens),
        "completion_mask": jnp.asarray(mask),
        "truncated": jnp.full((n,), not stop),
        "answer_tokens": jnp.asarray(gold),
        "answer_mask": jnp.asarray(gold_mask),
    }


def _decoded(tok, batch):
    """What the host rewards see: each completion decoded without its stop token."""
    rows = zip(np.asarray(batch["completion_tokens"]), np.asarray(batch["completion_mask"]), strict=True)
    return [tok.decode([i for i in t[m > 0].tolist() if i != tok.eos_id]) for t, m in rows]


def test_tags_are_split_and_edge_pieces_carry_neighbours(bpe):
    tok, spec = bpe
    added = tok.token_to_id("<think>") is not None  # "qwen3": the think tags are tokens, matched by id
    think_ids = (tok.token_to_id("<think>"), tok.token_to_id("</think>")) if added else (-1, -1)
    assert spec.tag_ids == (*think_ids, -1, -1) and spec.tag_texts == R1_TAGS
    for tag in R1_TAGS[2:] if added else R1_TAGS:
        for context in (tag, f" {tag}", f"\n{tag}", f"x.{tag}"):
            assert len(_pieces(tok, context)) > 1 and tag not in _pieces(tok, context), (context, tag)
    # The edge pieces of a tag also hold a neighbour's characters in context: the cases the matcher handles.
    assert " <" in _pieces(tok, " <answer>")
    assert "><" in _pieces(tok, "</answer><answer>")
    assert ".</" in _pieces(tok, "x.</answer>")
    hash(spec)


FORMAT_TEXTS = [
    # well formed
    "<think>We add 3 and 4.</think><answer>7</answer>",
    "<think>\nWe add 3 and 4.\n</think>\n<answer>\n7\n</answer>",
    " <think> so 3 </think> <answer> 7 </answer> ",
    "\n\n<think>x</think>\n\n<answer>7</answer>\n",
    "<think></think><answer></answer>",
    "<think>step 1.</think><answer>-7.</answer>",
    "<think>a < b > c</think><answer>a</b></answer>",
    "<think>中文 x</think><answer>7</answer>\t",
    # text outside the tags, some of it inside a tag's edge piece
    "text <think>x</think><answer>7</answer>",
    ".<think>x</think><answer>7</answer>",
    "<think>x</think> so <answer>7</answer>",
    "<think>x</think>.<answer>7</answer>",
    "<think>x</think><answer>7</answer>.",
    "<think>x</think><answer>7</answer>The end",
    # tags missing, out of order, nested, repeated, look-alikes
    "<think>x<answer>7</answer>",
    "<think>x</think>7</answer>",
    "<answer>7</answer><think>x</think>",
    "</think>x<think><answer>7</answer>",
    "<think>a<think>b</think></think><answer>7</answer>",
    "<think>x</think><answer><answer>7</answer></answer>",
    "<think>x</think><answer>7</answer><answer>8</answer>",
    "<thinking>x</thinking><answer>7</answer>",
    "< think>x</think><answer>7</answer>",
    "<think>x</think><answer>7",
    "the answer is 7",
]


def test_format_equals_host_r1_format(bpe):
    tok, spec = bpe
    batch = _batch(tok, FORMAT_TEXTS)
    decoded = _decoded(tok, batch)
    assert decoded == FORMAT_TEXTS  # the byte-level round trip is exact
    host = [r1_format_reward(text, {}) for text in decoded]
    assert sum(host) == 8 and host[:8] == [1.0] * 8  # the cases above say what they are
    formats = jax.jit(make_reward_fns([("format", 1.0), ("format", 1.0, {"require_stop": False})], spec))
    np.testing.assert_array_equal(formats(batch, None)[1]["format"], host)
    # Truncated (no stop token): `format` never scores; without require_stop it reads the text alone.
    truncated = formats(_batch(tok, FORMAT_TEXTS, stop=False), None)[1]
    np.testing.assert_array_equal(truncated["format"], [0.0] * len(FORMAT_TEXTS))
    np.testing.assert_array_equal(truncated["format_2"], host)


def test_format_partial_reads_split_tags(bpe):
    tok, spec = bpe
    texts = [FORMAT_TEXTS[0], FORMAT_TEXTS[14], FORMAT_TEXTS[16], FORMAT_TEXTS[18], FORMAT_TEXTS[24]]
    reward = _reward("format_partial", spec)(_batch(tok, texts))
    np.testing.assert_array_equal(reward, [1.0, 0.75, 0.0, 0.5, 0.0])


def test_a_tag_spelled_in_any_split_is_found(bpe):
    """The model may spell a tag in pieces the tokenizer would not choose: still the tag, as in the text,
    unless the tag is a token of its own ("qwen3"'s <think>), which the tokenizer never spells out."""
    tok, spec = bpe
    texts = vocabulary_texts(tok)
    char_ids = {texts[i]: i for i in range(tok.vocab_size) if len(texts[i]) == 1}

    def spelled(tag):
        ids = [char_ids[c] for c in tag]
        assert ids != tok.encode(tag)
        return ids

    answer = tok.encode("<think>x</think>") + spelled("<answer>") + tok.encode("7</answer>", add_eos=True)
    think = spelled("<think>") + tok.encode("x</think><answer>7</answer>", add_eos=True)
    batch = _batch(tok, [answer, think])
    assert _decoded(tok, batch) == ["<think>x</think><answer>7</answer>"] * 2
    think_is_a_token = spec.think_open != -1
    np.testing.assert_array_equal(_reward("format", spec)(batch), [1.0, 0.0 if think_is_a_token else 1.0])


ACCURACY_CASES = [
    # (completion, gold): in-graph `accuracy_numeric` must equal the host's `math_accuracy`
    ("<think>x</think><answer>7</answer>", "7"),
    ("<think>x</think><answer> 42 </answer>", "42"),
    ("<think>x</think>\n<answer>\n42\n</answer>", "42"),
    (" <answer>42</answer>. The end", "42"),
    ("<answer>042</answer>", "42"),
    ("<answer>4 2</answer>", "42"),
    ("<answer>-42</answer>", "-42"),
    ("<answer> -42 </answer>", "-42"),
    ("<answer>-42</answer>", "42"),
    ("<answer>43</answer>", "42"),
    ("<answer></answer>", "42"),
    ("<answer> </answer>", "42"),
    ("the answer is 42", "42"),
    ("<think>x</think><answer>42", "42"),
    ("<answer><answer>42</answer></answer>", "42"),
    ("</answer>42<answer>", "42"),
    ("<answer>forty two</answer>", "42"),
    ("<think>so 42</think><answer>7</answer>", "42"),
    ("<think>x</think><answer>7</answer><think>", "7"),
]


def test_accuracy_equals_host_math_accuracy(bpe):
    tok, spec = bpe
    completions, golds = zip(*ACCURACY_CASES, strict=True)
    batch = _batch(tok, list(completions), list(golds))
    decoded = _decoded(tok, batch)
    assert decoded == list(completions)
    host = [math_accuracy_reward(text, {"answer": gold}) for text, gold in zip(decoded, golds, strict=True)]
    assert host[:8] == [1.0] * 8 and sum(host) == 9
    parts = jax.jit(make_reward_fns([("accuracy_numeric", 1.0), ("accuracy", 1.0)], spec))(batch, None)[1]
    np.testing.assert_array_equal(parts["accuracy_numeric"], host)
    # Exact token match never accepts what the host rejects, and agrees with it where every answer is a
    # plain positive integer (no spaces, leading zeros, or "-" that the tag's piece may hold).
    exact, host = np.asarray(parts["accuracy"]), np.asarray(host)
    assert (exact <= host).all()
    plain = [
        i
        for i, (text, _) in enumerate(ACCURACY_CASES)
        if all(re.fullmatch(r"[1-9]\d*", a) for a in re.findall("<answer>(.*?)</answer>", text, re.DOTALL))
    ]
    assert len(plain) == 8 and host[plain].sum() == 3
    np.testing.assert_array_equal(exact[plain], host[plain])


def test_accuracy_text_inside_a_tag_piece(bpe):
    """A tag's edge piece that carries answer text: "-" after <answer> is the sign; other text is no
    integer, whatever the split, so these score 0 in-graph where the host's normaliser says 1."""
    tok, spec = bpe
    texts = ["<answer>-7</answer>", "<answer>42.</answer>", "<answer>4</answer><answer>42</answer>"]
    batch = _batch(tok, texts, ["-7", "42", "42"])
    assert [math_accuracy_reward(t, {"answer": g}) for t, g in zip(texts, ["-7", "42", "42"])] == [1.0] * 3
    np.testing.assert_array_equal(_reward("accuracy_numeric", spec)(batch), [1.0, 0.0, 0.0])


def test_language_consistency_inside_split_think_tags(bpe):
    tok, spec = bpe
    batch = _batch(tok, ["<think> so we add </think><answer>7</answer>", "<think> 7 + 3 </think>", "x"])
    reward = _reward("language_consistency", spec, tokenizer=tok)(batch)
    np.testing.assert_allclose(reward, [1.0, 0.0, 0.0])


def test_unspellable_or_ambiguous_tags_fail_with_one_line(bpe):
    tok, _ = bpe
    # "é" is two byte pieces here, and a piece that holds part of a character spells no character.
    with pytest.raises(ValueError, match="'<réponse>' is neither one token nor spelled"):
        TokenSpec.from_tokenizer(tok, answer_open="<réponse>")
    with pytest.raises(ValueError, match="cannot be matched as a token sequence"):
        TokenSpec.from_tokenizer(tok, think_open="<th<ink>")
