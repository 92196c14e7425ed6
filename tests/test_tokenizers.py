"""Tokenizers: SentencePiece training and round trips, HF tokenizer.json, loading and errors."""

import json

import pytest

from grpo_jax.tokenizers import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
)

TEXTS = [
    f"Question: what is {a}+{b}?\nAnswer: <think> {a}+{b}={a + b} </think>  <answer> {a + b} </answer>"
    for a in range(0, 40, 3)
    for b in range(5, 60, 7)
] + ["A conversation between User and Assistant.\tThe user asks a question."] * 5


@pytest.fixture(scope="module")
def sp():
    return train_sentencepiece(TEXTS, vocab_size=60)


def test_sentencepiece_ids_and_specials(sp):
    assert isinstance(sp, Tokenizer)
    assert (sp.pad_id, sp.eos_id, sp.bos_id, sp.vocab_size) == (0, 1, 2, 60)
    assert sp.special_ids() == {
        "<pad>": 0,
        "</s>": 1,
        "<s>": 2,
        "<unk>": 3,
        "<think>": 4,
        "</think>": 5,
        "<answer>": 6,
        "</answer>": 7,
    }
    for piece, idx in [("<think>", 4), ("</think>", 5), ("<answer>", 6), ("</answer>", 7)]:
        assert sp.token_to_id(piece) == idx
        assert sp.id_to_piece(idx) == piece
        assert idx in sp.encode(f"x {piece} y")
        assert [i for i in sp.encode(piece) if sp.id_to_piece(i) != "▁"] == [idx]
    assert sp.token_to_id("no-such-piece") is None
    assert sp.token_to_id("<unk>") == 3


def test_sentencepiece_round_trip_keeps_whitespace(sp):
    for text in TEXTS[:5] + [TEXTS[-1], "12+7=19  \n 3", "<think> 5+5=10 </think> <answer> 10 </answer>"]:
        assert sp.decode(sp.encode(text)) == text


def test_sentencepiece_bos_eos_and_special_decoding(sp):
    ids = sp.encode("3+4", add_bos=True, add_eos=True)
    assert ids[0] == 2 and ids[-1] == 1
    padded = ids + [sp.pad_id, sp.pad_id]
    assert sp.decode(padded, skip_special=True) == "3+4"
    assert sp.decode(padded) == "<s>3+4</s><pad><pad>"


def test_digits_are_single_tokens(sp):
    for digit in "0123456789":
        assert sp.token_to_id(digit) is not None
    pieces = [sp.id_to_piece(i) for i in sp.encode("12345+67890")]
    assert pieces == ["▁", "1", "2", "3", "4", "5", "+", "6", "7", "8", "9", "0"]


def test_training_is_deterministic():
    first = train_sentencepiece(TEXTS, vocab_size=50).serialized_model()
    second = train_sentencepiece(TEXTS, vocab_size=50).serialized_model()
    assert first == second
    assert train_sentencepiece(TEXTS[::-1], vocab_size=50).vocab_size == 50


def test_vocab_size_too_large_is_clear():
    with pytest.raises(ValueError, match=r"vocab_size=5000 is too large .*<= \d+"):
        train_sentencepiece(TEXTS, vocab_size=5000)
    with pytest.raises(ValueError, match="too small"):
        train_sentencepiece(TEXTS, vocab_size=8)
    soft = train_sentencepiece(TEXTS, vocab_size=5000, hard_vocab_limit=False)
    assert soft.vocab_size < 5000


def test_save_and_load(sp, tmp_path):
    path = tmp_path / "sub" / "tok.model"
    sp.save(path)
    loaded = load_tokenizer(path)
    assert isinstance(loaded, SentencePieceTokenizer)
    assert loaded.serialized_model() == sp.serialized_model()
    assert loaded.encode(TEXTS[0]) == sp.encode(TEXTS[0])
    directory = tmp_path / "dir"
    directory.mkdir()
    sp.save(directory / "tokenizer.model")
    assert load_tokenizer(directory).encode("7+8") == sp.encode("7+8")


def test_missing_files_name_the_path(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        SentencePieceTokenizer(missing)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match=r"tokenizer.json or tokenizer.model in directory .*empty"):
        (tmp_path / "empty").mkdir()
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="No tokenizer.json"):
        HFTokenizer(tmp_path / "empty")


# --------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json
# --------------------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_level_bpe(directory, tokenizer_config=None, special_tokens_map=None, config=None):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS, trainer=trainer)
    tok.add_tokens(["<think>", "</think>"])
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    for name, content in [
        ("tokenizer_config.json", tokenizer_config),
        ("special_tokens_map.json", special_tokens_map),
        ("config.json", config),
    ]:
        if content is not None:
            (directory / name).write_text(json.dumps(content))
    return tok


def test_hf_tokenizer_round_trip_and_specials(tmp_path):
    config = {"eos_token": {"content": "<|im_end|>"}, "bos_token": None, "chat_template": CHAT_TEMPLATE}
    raw = _byte_level_bpe(tmp_path / "hf", tokenizer_config=config, config={"bos_token_id": 0})
    tok = load_tokenizer(tmp_path / "hf")
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    eos = raw.token_to_id("<|im_end|>")
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (eos, None, eos)  # explicit null bos wins over config.json
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    for text in TEXTS[:3] + ["  odd  spacing\n\tand ünïcode ✓"]:
        assert tok.decode(tok.encode(text)) == text
    think = tok.token_to_id("<think>")
    assert think is not None and tok.encode("a <think> b").count(think) == 1
    assert tok.special_ids() == {
        "<|endoftext|>": 0,
        "<|im_start|>": 1,
        "<|im_end|>": 2,
        "<think>": think,
        "</think>": think + 1,
    }
    ids = tok.encode("1+2", add_eos=True)
    assert ids[-1] == eos and tok.decode(ids, skip_special=True) == "1+2"
    assert tok.decode(ids) == "1+2<|im_end|>"
    with pytest.raises(ValueError, match="no BOS"):
        tok.encode("x", add_bos=True)
    rendered = tok.apply_chat_template([{"role": "user", "content": "2+2?"}])
    assert rendered == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_hf_tokenizer_falls_back_to_special_map_and_config(tmp_path):
    _byte_level_bpe(
        tmp_path / "hf",
        special_tokens_map={"pad_token": "<|im_start|>"},
        config={"eos_token_id": [2, 0], "bos_token_id": 0},
    )
    tok = HFTokenizer(tmp_path / "hf")
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (2, 0, 1)
    assert tok.encode("x", add_bos=True)[0] == 0
    with pytest.raises(ValueError, match="no chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_hf_tokenizer_without_eos_is_an_error(tmp_path):
    _byte_level_bpe(tmp_path / "hf")
    with pytest.raises(ValueError, match="No EOS token"):
        HFTokenizer(tmp_path / "hf")
