"""Tokenizers behind one small protocol: native SentencePiece and Hugging Face `tokenizer.json`.

Everything else in grpo_jax (templates, data pipelines, in-graph rewards, the sampler's `eos_id`) talks to a
`Tokenizer`. Two implementations:

- `SentencePieceTokenizer`: a serialized SentencePiece model (a `.model` file or bytes). `train_sentencepiece`
  trains one in-process and deterministically, for synthetic tasks and tests (no download).
- `HFTokenizer`: a directory with `tokenizer.json` (Llama, Qwen2, DeepSeek-R1-Distill, ...), read with the
  optional `tokenizers` package; special ids come from `tokenizer_config.json`, `special_tokens_map.json` or
  `config.json`.

`load_tokenizer(path)` picks the right one from what is on disk.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import sentencepiece as spm

R1_SPECIAL_SYMBOLS = ("<think>", "</think>", "<answer>", "</answer>")

# Ids of the control pieces in models trained by `train_sentencepiece`. pad is 0 so zero-filled buffers are
# padding; eos is 1 so it stays fixed whatever the vocabulary size.
SP_PAD_ID, SP_EOS_ID, SP_BOS_ID, SP_UNK_ID = 0, 1, 2, 3


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of grpo_jax needs from a tokenizer.

    `bos_id` is None when the model has no BOS token (Qwen2); `pad_id` is never None (it falls back to eos).
    """

    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str: ...

    def token_to_id(self, piece: str) -> int | None: ...

    def id_to_piece(self, idx: int) -> str: ...

    def special_ids(self) -> dict[str, int]: ...


def _wrap_bos_eos(ids: list[int], bos_id: int | None, eos_id: int, add_bos: bool, add_eos: bool) -> list[int]:
    if add_bos:
        if bos_id is None:
            raise ValueError("add_bos=True but this tokenizer has no BOS token (bos_id is None).")
        ids = [bos_id, *ids]
    if add_eos:
        ids = [*ids, eos_id]
    return ids


# --------------------------------------------------------------------------------------------------
# SentencePiece
# --------------------------------------------------------------------------------------------------


class SentencePieceTokenizer:
    """A SentencePiece model behind the `Tokenizer` protocol.

    Args:
      model: serialized model proto bytes, or a path to a `.model` file.
    """

    def __init__(self, model: bytes | str | os.PathLike):
        if isinstance(model, (bytes, bytearray)):
            self._proto = bytes(model)
        else:
            path = os.fspath(model)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"SentencePiece model file not found: {path}")
            with open(path, "rb") as f:
                self._proto = f.read()
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.vocab_size = int(self._sp.get_piece_size())
        self.unk_id = int(self._sp.unk_id())
        eos = int(self._sp.eos_id())
        if eos < 0:
            raise ValueError(
                "SentencePiece model has no EOS piece (eos_id = -1); grpo_jax needs one to stop sampling."
            )
        self.eos_id = eos
        bos = int(self._sp.bos_id())
        self.bos_id = bos if bos >= 0 else None
        pad = int(self._sp.pad_id())
        self.pad_id = pad if pad >= 0 else eos
        self._control = {i for i in range(self.vocab_size) if self._sp.is_control(i)}
        self._user_defined = self._find_user_defined()

    def _find_user_defined(self) -> set[int]:
        """Ids of user-defined symbols (e.g. `<think>`): always single tokens, decoded as text."""
        try:
            from sentencepiece import sentencepiece_model_pb2
        except ImportError:  # protobuf missing: fall back to "<...> pieces that encode to themselves".
            found = set()
            for i in range(self.vocab_size):
                piece = self._sp.id_to_piece(i)
                if (
                    piece.startswith("<")
                    and piece.endswith(">")
                    and i not in self._control
                    and i != self.unk_id
                ):
                    if i in self._sp.encode(piece):
                        found.add(i)
            return found
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self._proto)
        user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
        return {i for i, piece in enumerate(proto.pieces) if piece.type == user_defined}

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [int(i) for i in self._sp.encode(text)]
        return _wrap_bos_eos(ids, self.bos_id, self.eos_id, add_bos, add_eos)

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of `ids`; control pieces (pad/eos/bos) are dropped if `skip_special`, else shown as pieces.

        User-defined symbols such as `<think>` are text and always kept.
        """
        ids = [int(i) for i in ids]
        if skip_special:
            return self._sp.decode([i for i in ids if i not in self._control])
        parts, run = [], []
        for i in ids:
            if i in self._control:
                parts.append(self._sp.decode(run))
                parts.append(self._sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        parts.append(self._sp.decode(run))
        return "".join(parts)

    def token_to_id(self, piece: str) -> int | None:
        idx = int(self._sp.piece_to_id(piece))
        if idx == self.unk_id and piece != self._sp.id_to_piece(self.unk_id):
            return None
        return idx

    def id_to_piece(self, idx: int) -> str:
        return self._sp.id_to_piece(int(idx))

    def special_ids(self) -> dict[str, int]:
        """Control pieces, unk and user-defined symbols, piece -> id."""
        ids = sorted(self._control | self._user_defined | {self.unk_id})
        return {self._sp.id_to_piece(i): i for i in ids}

    def serialized_model(self) -> bytes:
        return self._proto

    def save(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(self._proto)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def train_sentencepiece(
    texts: Iterable[str],
    *,
    vocab_size: int,
    user_defined_symbols: Sequence[str] = R1_SPECIAL_SYMBOLS,
    model_type: str = "bpe",
    split_digits: bool = True,
    character_coverage: float = 1.0,
    byte_fallback: bool = False,
    hard_vocab_limit: bool = True,
    normalization_rule_name: str = "identity",
    max_sentence_length: int = 1 << 16,
    seed: int = 0,
) -> SentencePieceTokenizer:
    """Trains a SentencePiece model in memory; the same texts and arguments give byte-identical models.

    Ids: pad=0, eos=1 (`</s>`), bos=2 (`<s>`), unk=3, then `user_defined_symbols` (each one id, in order),
    then the learned pieces. `split_digits` makes every digit its own token so arithmetic is learnable.
    Normalization is `identity` and whitespace is kept as is, so `decode(encode(t)) == t` for any text made of
    characters seen in training.

    Args:
      texts: training sentences (read once, in order; no shuffling, one thread, for determinism).
      vocab_size: total vocabulary size including the 4 control pieces and the user-defined symbols.
      hard_vocab_limit: if False, SentencePiece may return a smaller vocabulary than asked for when the text
        is too small; if True (default) a too-large `vocab_size` raises a ValueError naming the maximum.
      seed: SentencePiece's random generator seed (only used by sampling-based trainers such as `unigram`).
    """
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_sentencepiece: no non-empty training texts.")
    min_size = 4 + len(user_defined_symbols) + 1
    if vocab_size < min_size:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: 4 control pieces + {len(user_defined_symbols)} "
            f"user-defined symbols need at least {min_size}."
        )
    spm.set_random_generator_seed(seed)
    model_writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model_writer,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=SP_PAD_ID,
            eos_id=SP_EOS_ID,
            bos_id=SP_BOS_ID,
            unk_id=SP_UNK_ID,
            user_defined_symbols=list(user_defined_symbols),
            split_digits=split_digits,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            hard_vocab_limit=hard_vocab_limit,
            normalization_rule_name=normalization_rule_name,
            remove_extra_whitespaces=False,
            max_sentence_length=max_sentence_length,
            num_threads=1,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
    except RuntimeError as e:
        message = str(e)
        if "Vocabulary size" in message:
            hint = message[message.find("Vocabulary size") :]
            raise ValueError(
                f"train_sentencepiece: vocab_size={vocab_size} is too large for {len(texts)} training texts "
                f"({hint}). Lower vocab_size, add text, or pass hard_vocab_limit=False."
            ) from e
        raise
    return SentencePieceTokenizer(model_writer.getvalue())


# --------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json
# --------------------------------------------------------------------------------------------------


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: Any) -> str | None:
    """`"</s>"` or `{"content": "</s>", ...}` -> `"</s>"`."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class HFTokenizer:
    """A Hugging Face `tokenizer.json` directory behind the `Tokenizer` protocol.

    Special tokens are read in order of precedence from `tokenizer_config.json`, `special_tokens_map.json`,
    then `config.json` (`*_token_id`, first element if a list). An explicit `"bos_token": null` (Qwen2) means
    no BOS. pad falls back to eos.
    """

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"No tokenizer.json in {path}")
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError(
                "Reading tokenizer.json needs the `tokenizers` package: pip install grpo_jax[hf]"
            ) from e
        self.path = path
        self._tok = tokenizers.Tokenizer.from_file(tokenizer_file)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.config = _read_json(os.path.join(path, "tokenizer_config.json"))
        special_map = _read_json(os.path.join(path, "special_tokens_map.json"))
        model_config = _read_json(os.path.join(path, "config.json"))

        def lookup(name: str) -> int | None:
            for source in (self.config, special_map):
                if f"{name}_token" in source:
                    content = _token_content(source[f"{name}_token"])
                    if content is None:
                        return None
                    idx = self._tok.token_to_id(content)
                    if idx is None:
                        raise ValueError(
                            f"{name}_token {content!r} of {path} is not in tokenizer.json's vocabulary."
                        )
                    return int(idx)
            idx = model_config.get(f"{name}_token_id")
            if isinstance(idx, list):
                idx = idx[0] if idx else None
            return None if idx is None else int(idx)

        eos = lookup("eos")
        if eos is None:
            raise ValueError(
                f"No EOS token found for {path}: set eos_token in tokenizer_config.json "
                "or eos_token_id in config.json."
            )
        self.eos_id = eos
        self.bos_id = lookup("bos")
        pad = lookup("pad")
        self.pad_id = eos if pad is None else pad
        self._special = {
            int(i): t.content for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        }

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`, without the post-processor's specials; BOS/EOS only when asked."""
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        return _wrap_bos_eos(ids, self.bos_id, self.eos_id, add_bos, add_eos)

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_to_id(self, piece: str) -> int | None:
        idx = self._tok.token_to_id(piece)
        return None if idx is None else int(idx)

    def id_to_piece(self, idx: int) -> str:
        piece = self._tok.id_to_token(int(idx))
        if piece is None:
            raise IndexError(f"token id {idx} out of range for vocab_size={self.vocab_size}")
        return piece

    def special_ids(self) -> dict[str, int]:
        """All added tokens (special or not, e.g. Qwen3's `<think>`) plus eos/bos/pad, piece -> id."""
        out = {t.content: int(i) for i, t in self._tok.get_added_tokens_decoder().items()}
        for idx in (self.eos_id, self.bos_id, self.pad_id):
            if idx is not None:
                out[self.id_to_piece(idx)] = idx
        return dict(sorted(out.items(), key=lambda kv: kv[1]))

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        """Renders `messages` with tokenizer_config.json's jinja `chat_template`, as transformers does."""
        template = self.config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            by_name = {t["name"]: t["template"] for t in template}
            template = by_name.get("default")
        if not template:
            raise ValueError(f"{self.path}/tokenizer_config.json has no chat_template.")
        try:
            import jinja2.sandbox
        except ImportError as e:
            raise ImportError("apply_chat_template needs jinja2: pip install jinja2") from e

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(template).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.id_to_piece(self.bos_id) if self.bos_id is not None else "",
            eos_token=self.id_to_piece(self.eos_id),
        )

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike) -> SentencePieceTokenizer | HFTokenizer:
    """Loads `path`: a `.model` file or a directory with tokenizer.model -> SentencePieceTokenizer; a
    directory with tokenizer.json (or that file) -> HFTokenizer."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if path.endswith(".model"):
            return SentencePieceTokenizer(path)
        if os.path.basename(path) == "tokenizer.json":
            return HFTokenizer(os.path.dirname(path) or ".")
        raise ValueError(
            f"Unrecognised tokenizer file {path}: expected a SentencePiece .model or tokenizer.json."
        )
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return HFTokenizer(path)
        if os.path.isfile(os.path.join(path, "tokenizer.model")):
            return SentencePieceTokenizer(os.path.join(path, "tokenizer.model"))
        raise FileNotFoundError(f"No tokenizer.json or tokenizer.model in directory {path}")
    raise FileNotFoundError(
        f"Tokenizer not found: {path} "
        "(expected a .model file or a directory with tokenizer.json/tokenizer.model)"
    )
