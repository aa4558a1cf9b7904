"""Shared builders for the data tests: a character tokenizer, dataset files, small images."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from sphinx_model.tokenizer import Tokenizer


class CharTokenizer(Tokenizer):
    """One token per ASCII character (id = its code point); BOS 1, EOS 2. Exact lengths, fast."""

    bos_id, eos_id, vocab_size = 1, 2, 128

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids if i > 2)


def write_jsonl(path: Path, items: list) -> Path:
    """Items as JSONL; a str item is written as the raw line (for malformed lines)."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items)
    return path


def dialogue(*pairs: tuple[str, str], image: str | None = None) -> dict:
    """A LLaVA-format item from (question, answer) pairs; the image placeholder goes first."""
    turns = []
    for k, (question, answer) in enumerate(pairs):
        prefix = "<image>\n" if image and k == 0 else ""
        turns += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    return {"conversations": turns, **({"image": image} if image else {})}


def make_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A small RGB image of a pattern (varies with seed), saved in the format of its suffix."""
    image = Image.new("RGB", (width, height))
    image.putdata([((x * 7 + seed * 31) % 256, (y * 5 + seed * 17) % 256, (x + y + seed) % 256)
                   for y in range(height) for x in range(width)])
    image.save(path)
    return path
