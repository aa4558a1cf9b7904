"""``sphinx-chat``: talk to a trained model from the terminal.

    sphinx-chat --checkpoint runs/demo/final --image photo.jpg "What is in the picture?"
    sphinx-chat --checkpoint runs/demo/final --image photo.jpg      # an interactive chat
    python -m sphinx_model.chat ...                                   # the same

``--checkpoint`` is one of: a ``SphinxX.save_pretrained`` directory (the trainer's ``<output>/final``:
``config.json``, safetensors, ``tokenizer.model``), a Hugging Face LLM directory (text only), or a
LLaMA2-Accessory SPHINX checkpoint (``consolidated.NN-of-MM.model.pth`` with its ``config.json``).
The tokenizer is read from the checkpoint directory unless ``--tokenizer`` names one.

With a question it answers once; without, it reads questions line by line (``Human:``) until an
empty line, ``exit`` or end of input, keeping the conversation (and the image) across turns and
dropping the oldest exchanges when the dialogue outgrows the model's positions. Prompts use the
trainer's conversation template (``sphinx_model.conversation.SPHINX_TEMPLATE``), the image block right
after BOS; answers stream as they are generated and end at EOS or the template's separator. Greedy
by default; ``--temperature`` > 0 samples (with ``--top-p`` and ``--seed``).

Errors a user can fix (a bad path, an unreadable image or checkpoint) print one line
``sphinx-chat: error: ...`` and exit with status 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image
from safetensors import SafetensorError

from sphinx_model.accessory_sphinx import load_accessory_sphinx
from sphinx_model.checkpoints import load_hf_llm
from sphinx_model.conversation import ASSISTANT, SPHINX_TEMPLATE, USER, Turn, encode_prompt
from sphinx_model.data import image_block_rows
from sphinx_model.generate import ChatPrompt, stream_generate
from sphinx_model.llm import LLM
from sphinx_model.sphinx import CONFIG_FILE, SphinxX
from sphinx_model.tiling import TiledImage, tile_image
from sphinx_model.tokenizer import Tokenizer, load_tokenizer

__all__ = ["AnswerStream", "checkpoint_kind", "load_chat_model", "main"]

PROG = "sphinx-chat"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What a user can fix: printed as one line, not a traceback.
USER_ERRORS = (OSError, ValueError, TypeError, SafetensorError)


def checkpoint_kind(path: str | Path) -> str:
    """What the directory holds, from its files alone: ``"accessory"`` (a LLaMA2-Accessory SPHINX
    checkpoint), ``"sphinx"`` (``SphinxX.save_pretrained``) or ``"hf"`` (a Hugging Face LLM);
    anything else is an error naming the path."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint {path}: no such directory")
    if any(path.glob("consolidated.*.pth")):
        return "accessory"
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"--checkpoint {path}: no {CONFIG_FILE} (expected a "
                                "SphinxX.save_pretrained directory, a Hugging Face LLM directory or "
                                "a LLaMA2-Accessory checkpoint)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from None
    if isinstance(config, dict) and "llm" in config and "vision" in config:
        return "sphinx"
    if isinstance(config, dict) and "model_type" in config:
        return "hf"
    raise ValueError(f"{config_file} is neither a SphinxConfig (llm, vision, ...) nor a Hugging Face "
                     "config (model_type)")


def load_chat_model(path: str | Path, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> LLM | SphinxX:
    """The model of a checkpoint directory (:func:`checkpoint_kind`): a :class:`SphinxX` (a
    ``save_pretrained`` directory or a LLaMA2-Accessory SPHINX checkpoint) or a text-only
    :class:`LLM` (a Hugging Face directory)."""
    loaders = {"accessory": load_accessory_sphinx, "sphinx": SphinxX.from_pretrained,
               "hf": load_hf_llm}
    return loaders[checkpoint_kind(path)](path, dtype=dtype, device=device)


def open_image(path: str | Path) -> Image.Image:
    """The image at ``path``, fully decoded; a missing or unreadable file is an ``OSError`` /
    ``ValueError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--image {path}: no such file")
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"--image {path}: not a readable image ({error})") from None
    return image


class AnswerStream:
    """Writes an answer to ``out`` as its tokens arrive and keeps its text.

    Text is decoded incrementally (``Tokenizer.stream_decoder``); the leading space of the answer is
    dropped, and text that may be the start of ``stop_text`` is held back until it is known not to
    be, so the stop text itself is never written.
    """

    def __init__(self, tokenizer: Tokenizer, stop_text: str, out: TextIO):
        self.decoder = tokenizer.stream_decoder()
        self.stop_text = stop_text
        self.out = out
        self.text = ""       # all decoded text
        self.written = 0     # characters of the answer (leading spaces dropped) written
        self.stopped = False

    def push(self, token: int) -> None:
        if not self.stopped:
            self.text += self.decoder.push(token)
            self._write(final=False)

    def finish(self) -> str:
        """Writes what was held back and a newline; returns the answer's text."""
        if not self.stopped:
            self.text += self.decoder.flush()
            self._write(final=True)
        self.out.write("\n")
        self.out.flush()
        return SPHINX_TEMPLATE.answer_text(self._visible().strip())

    def _visible(self) -> str:
        return self.text[:self.text.find(self.stop_text)] if self.stopped else self.text

    def _write(self, final: bool) -> None:
        if self.stop_text in self.text:
            self.stopped = True
        visible = self._visible()
        if not self.stopped and not final:
            visible = visible[:len(visible) - _partial_suffix(visible, self.stop_text)]
        answer = visible.lstrip()
        if self.stopped or final:
            answer = answer.rstrip()
        if len(answer) > self.written:
            self.out.write(answer[self.written:])
            self.out.flush()
            self.written = len(answer)


def _partial_suffix(text: str, stop: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0


class ChatSession:
    """The conversation: its turns, the tiled image, and how to answer the next question."""

    def __init__(self, model: LLM | SphinxX, tokenizer: Tokenizer, image: TiledImage | None,
                 args: argparse.Namespace):
        self.model, self.tokenizer, self.image, self.args = model, tokenizer, image, args
        self.turns: list[Turn] = []
        llm = model.llm if isinstance(model, SphinxX) else model
        self.max_positions = llm.config.max_position_embeddings
        self.image_rows = 0 if image is None else image_block_rows(
            image.skipped, model.config.vision.tokens_per_view)

    def ask(self, question: str, out: TextIO) -> str:
        """Answers ``question`` (streamed to ``out``) and appends the exchange to the turns."""
        self.turns.append(Turn(USER, question))
        ids = encode_prompt(self.tokenizer, self.turns)
        # The oldest exchanges go when the dialogue no longer fits the model's positions.
        while (len(ids) + self.image_rows + self.args.max_new_tokens > self.max_positions
               and len(self.turns) > 2):
            self.turns = self.turns[2:]
            ids = encode_prompt(self.tokenizer, self.turns)
        if isinstance(self.model, SphinxX):
            prompt = ChatPrompt(ids, [] if self.image is None else [self.image])
        else:
            prompt = ids
        stream = AnswerStream(self.tokenizer, SPHINX_TEMPLATE.stop_text, out)
        args = self.args
        sampling = args.temperature > 0
        for _, token in stream_generate(
                self.model, [prompt], args.max_new_tokens, do_sample=sampling,
                temperature=args.temperature if sampling else 1.0, top_p=args.top_p,
                seed=args.seed, eos_token_id=self.tokenizer.eos_id,
                stop_strings=[SPHINX_TEMPLATE.stop_text], tokenizer=self.tokenizer):
            stream.push(token)
        answer = stream.finish()
        self.turns.append(Turn(ASSISTANT, answer))
        return answer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Chat with a SPHINX-X model (or a Hugging Face LLM, text only).",
        epilog="Without a question: an interactive chat (an empty line, 'exit' or Ctrl-D ends it).")
    parser.add_argument("question", nargs="?", help="answer this once and exit")
    parser.add_argument("--checkpoint", required=True,
                        help="a SphinxX.save_pretrained directory, a Hugging Face LLM directory or "
                             "a LLaMA2-Accessory SPHINX checkpoint")
    parser.add_argument("--image", help="an image file the conversation is about")
    parser.add_argument("--tokenizer", help="tokenizer.model / tokenizer.json, or a directory "
                                            "holding one (default: the checkpoint directory)")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="at most this many tokens per answer (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default): greedy; > 0: sample at this temperature")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus of sampling (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="seed of sampling")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="default: bfloat16 on a GPU, float32 on the CPU")
    return parser


def main(argv: list[str] | None = None, *, stdin: TextIO | None = None,
         stdout: TextIO | None = None) -> int:
    """The CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    out = stdout or sys.stdout
    try:
        session = _start(args)
        if args.question is not None:
            session.ask(args.question, out)
        else:
            _interactive(session, stdin or sys.stdin, out)
    except USER_ERRORS as error:
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=out)
        return 130
    return 0


def _start(args: argparse.Namespace) -> ChatSession:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    image = open_image(args.image) if args.image is not None else None  # fail before loading
    checkpoint = Path(args.checkpoint)
    checkpoint_kind(checkpoint)  # a wrong directory is reported before anything is read
    tokenizer = load_tokenizer(args.tokenizer or checkpoint)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[args.dtype] if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = load_chat_model(checkpoint, dtype=dtype, device=device)
    llm = model.llm if isinstance(model, SphinxX) else model
    if tokenizer.vocab_size > llm.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                         f"vocab_size is {llm.config.vocab_size}: --tokenizer does not belong to "
                         f"{checkpoint}")
    tiled = None
    if image is not None:
        if not isinstance(model, SphinxX):
            raise ValueError(f"--image needs a SPHINX checkpoint; {checkpoint} is a text-only LLM")
        tiled = tile_image(image, model.config.vision)
    return ChatSession(model, tokenizer, tiled, args)


def _interactive(session: ChatSession, stdin: TextIO, out: TextIO) -> None:
    prompt_on_tty = stdin.isatty()
    while True:
        if prompt_on_tty:
            out.write("Human: ")
            out.flush()
        line = stdin.readline()
        question = line.strip()
        if not line or not question or question in ("exit", "quit"):
            return
        out.write("Assistant: ")
        session.ask(question, out)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
