"""Tokenizers from local files: a SentencePiece ``tokenizer.model`` or a Hugging Face
``tokenizer.json``.

    tok = load_tokenizer("path/to/checkpoint")   # a directory, or the file itself
    ids = tok.encode("Hello world")                # no BOS / EOS added
    tok.decode(ids) == "Hello world"
    stream = tok.stream_decoder()                  # for printing tokens as they are generated
    text = "".join(stream.push(i) for i in ids) + stream.flush()

A directory holding both files loads ``tokenizer.model`` (the SentencePiece model itself, what the
SPHINX reference tokenises with). BOS / EOS ids come, in this order, from the arguments, the
directory's ``config.json`` (``bos_token_id`` / ``eos_token_id``, the ids the checkpoint was trained
with), ``tokenizer_config.json``'s ``bos_token`` / ``eos_token``, then the tokenizer itself.

``encode_continuation`` tokenises text as it appears in the middle of a stream: a SentencePiece
model prepends a space to what it encodes (``encode("Hi")`` gives ``▁Hi``); a continuation does not,
so segments encoded one by one and concatenated equal the whole string encoded at once when every
segment after the first starts at a space (how :mod:`sphinx_model.conversation` renders
dialogues).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["HFTokenizer", "SentencePieceTokenizer", "StreamDecoder", "Tokenizer", "load_tokenizer"]

# Text that never merges with what follows it: a continuation is encoded after it, its tokens
# dropped.
_CONTINUATION_SENTINEL = "\n"
# Token strings tried for BOS / EOS when nothing names them (Llama / Mistral, Llama 3, GPT-2).
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<|endoftext|>")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>")


class Tokenizer:
    """A text tokenizer: ``encode`` / ``decode`` and the ids the model needs.

    Attributes:
        bos_id, eos_id: the beginning- and end-of-sequence token ids.
        vocab_size: ids are in ``[0, vocab_size)``.
    """

    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` at the start of a sequence, without BOS / EOS."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; special tokens (BOS, EOS) decode to nothing."""
        raise NotImplementedError

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Writes the tokenizer file into ``directory`` (``tokenizer.model`` or ``tokenizer.json``,
        what :func:`load_tokenizer` reads back); returns its path. BOS / EOS ids are not written:
        a checkpoint's config.json carries them."""
        raise NotImplementedError

    def encode_continuation(self, text: str) -> list[int]:
        """Token ids of ``text`` following earlier text (no leading space is added). For tokenizers
        that add none, the same as :meth:`encode`."""
        sentinel = self._sentinel_ids
        ids = self.encode(_CONTINUATION_SENTINEL + text)
        if ids[:len(sentinel)] == sentinel:
            return ids[len(sentinel):]
        return self.encode(text)  # the sentinel merged with the text: no cleaner split exists

    def stream_decoder(self) -> StreamDecoder:
        """A decoder fed one id at a time (see :class:`StreamDecoder`)."""
        return StreamDecoder(self)

    @property
    def _sentinel_ids(self) -> list[int]:
        if not hasattr(self, "_sentinel"):
            self._sentinel = self.encode(_CONTINUATION_SENTINEL)
        return self._sentinel

    def _check_ids(self, source: str) -> None:
        for name in ("bos_id", "eos_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} = {value!r} from {source} is not a token id in "
                                 f"[0, {self.vocab_size}); pass {name}= to load_tokenizer")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id})")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (``tokenizer.model``: Llama, Mistral / Mixtral, InternLM2)."""

    def __init__(self, model: bytes, bos_id: int | None = None, eos_id: int | None = None,
                 source: str = "the SentencePiece model"):
        self._model = model
        self._sp = _sentencepiece(model)
        self.vocab_size = self._sp.vocab_size()
        self.bos_id = self._sp.bos_id() if bos_id is None else bos_id
        self.eos_id = self._sp.eos_id() if eos_id is None else eos_id
        self._check_ids(source)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / "tokenizer.model"
        path.write_bytes(self._model)
        return path

    def __getstate__(self):  # DataLoader workers: the model travels as its bytes
        return {"model": self._model, "bos_id": self.bos_id, "eos_id": self.eos_id}

    def __setstate__(self, state):
        self.__init__(state["model"], state["bos_id"], state["eos_id"])


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``)."""

    def __init__(self, spec: str, bos_id: int | None = None, eos_id: int | None = None,
                 source: str = "tokenizer.json", bos_token: str | None = None,
                 eos_token: str | None = None):
        """``spec``: the tokenizer.json text. Ids not given are looked up by name: ``bos_token`` /
        ``eos_token`` (from tokenizer_config.json), else the usual names."""
        from tokenizers import Tokenizer as _HFTokenizer

        self._spec = spec
        self._tok = _HFTokenizer.from_str(spec)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        if bos_id is None:
            bos_id = self._named_id((bos_token,) if bos_token else _BOS_NAMES, "bos_id", source)
        if eos_id is None:
            eos_id = self._named_id((eos_token,) if eos_token else _EOS_NAMES, "eos_id", source)
        self.bos_id, self.eos_id = bos_id, eos_id
        self._check_ids(source)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def _named_id(self, names: Sequence[str], what: str, source: str) -> int:
        for name in names:
            found = self._tok.token_to_id(name)
            if found is not None:
                return found
        raise ValueError(f"{source} names no {what} (none of {', '.join(names)} is a token); pass "
                         f"{what}= to load_tokenizer")

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / "tokenizer.json"
        path.write_text(self._spec, encoding="utf-8")
        return path

    def __getstate__(self):
        return {"spec": self._spec, "bos_id": self.bos_id, "eos_id": self.eos_id}

    def __setstate__(self, state):
        self.__init__(state["spec"], state["bos_id"], state["eos_id"])


class StreamDecoder:
    """Decodes ids pushed one at a time into text pieces whose concatenation equals
    ``tokenizer.decode(all ids)``.

    A piece is emitted only once it is final: a token that ends inside a multi-byte character
    (SentencePiece byte fallback, byte-level BPE) decodes to U+FFFD and is held back until the
    character completes; the text is decoded over a window starting one emitted token back, so a
    tokenizer's removal of the leading space of a sequence applies to the window's first token
    only, whose text was emitted already.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0   # the window's first id (one before the first unemitted one)
        self._read = 0     # ids before this are emitted

    def push(self, token_id: int) -> str:
        """Adds one id; returns the text that became final ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end decodes as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self._tokenizer.decode
        done = decode(self._ids[self._prefix:self._read])
        text = decode(self._ids[self._prefix:])
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done):]


def load_tokenizer(path: str | os.PathLike, *, bos_id: int | None = None,
                   eos_id: int | None = None) -> Tokenizer:
    """The tokenizer at ``path``: a SentencePiece model file, a ``tokenizer.json``, or a directory
    holding either (``tokenizer.model`` preferred). ``bos_id`` / ``eos_id`` override the ids found
    (see the module docstring for where they come from). A file that is not a tokenizer raises
    ``ValueError`` naming it; a missing path ``FileNotFoundError``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {str(path)!r} does not exist")
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        candidates = [path / "tokenizer.model", path / "tokenizer.json"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise ValueError(f"tokenizer path {str(path)!r} holds neither tokenizer.model nor "
                             "tokenizer.json")
        path = found[0]
    config_bos, config_eos, source = _special_ids(folder)
    bos_id = config_bos if bos_id is None else bos_id
    eos_id = config_eos if eos_id is None else eos_id
    source = source or str(path)
    if path.suffix == ".json":
        spec = path.read_text(encoding="utf-8")
        try:
            json.loads(spec)
        except json.JSONDecodeError as exc:
            raise ValueError(f"tokenizer file {str(path)!r} is not valid JSON: {exc}") from None
        names = _token_names(folder)
        return HFTokenizer(spec, bos_id, eos_id, source, names.get("bos"), names.get("eos"))
    model = path.read_bytes()
    try:
        return SentencePieceTokenizer(model, bos_id, eos_id, source)
    except (RuntimeError, OSError) as exc:
        raise ValueError(f"tokenizer file {str(path)!r} is not a SentencePiece model "
                         f"(nor a .json tokenizer): {exc}") from None


def _sentencepiece(model: bytes):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_proto=model)


def _special_ids(folder: Path) -> tuple[int | None, int | None, str | None]:
    """BOS / EOS ids from a checkpoint directory's config.json (the first of a list), and the
    file's name."""
    config = folder / "config.json"
    if not config.is_file():
        return None, None, None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        return None, None, None
    # A Hugging Face config has the ids at the top (or in text_config); a SphinxConfig under llm.
    nested = [data.get(k) for k in ("text_config", "llm") if isinstance(data.get(k), dict)]
    ids = []
    for key in ("bos_token_id", "eos_token_id"):
        value = next((d[key] for d in [data, *nested] if key in d), None)
        value = value[0] if isinstance(value, list) and value else value
        ids.append(value if isinstance(value, int) and not isinstance(value, bool) else None)
    return ids[0], ids[1], str(config)


def _token_names(folder: Path) -> dict[str, str]:
    """``{"bos": token, "eos": token}`` from tokenizer_config.json, where named."""
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return {}
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    names = {}
    for key in ("bos", "eos"):
        value = data.get(f"{key}_token") if isinstance(data, dict) else None
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            names[key] = value
    return names
