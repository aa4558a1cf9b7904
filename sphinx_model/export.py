"""``sphinx-export``: a training checkpoint as a ``SphinxX.save_pretrained`` directory.

The trainer's checkpoints (``<output>/checkpoints/step-N/``, see
:mod:`sphinx_model.train_checkpoint`) hold the model and optimizer shards of every rank, the
tokenizer and the configuration. Exporting reads only the model's tensors, in one process, whatever
the world size that wrote them, and writes what :meth:`SphinxX.from_pretrained`, ``sphinx-chat`` and
``sphinx-mix`` read: ``config.json``, safetensors weights (float32, as trained) and the tokenizer
file. The trainer writes the same for its last step into ``<output>/final/``.

    sphinx-export runs/demo/checkpoints/step-200 runs/demo/step-200
    python -m sphinx_model.export CHECKPOINT OUTPUT
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from sphinx_model.checkpoints import atomic_directory
from sphinx_model.config import SphinxConfig
from sphinx_model.sphinx import SphinxX
from sphinx_model.tokenizer import Tokenizer, load_tokenizer
from sphinx_model.train_checkpoint import load_model_state, read_trainer_state

__all__ = ["export_checkpoint", "write_pretrained"]


def write_pretrained(state: dict[str, torch.Tensor], config: SphinxConfig, tokenizer: Tokenizer,
                     path: str | os.PathLike) -> Path:
    """Writes the model ``state`` (``SphinxX.checkpoint_state`` keys or the full ``state_dict``,
    CPU tensors) of a ``config`` model with the ``tokenizer``'s file into ``path`` atomically (a
    temporary directory, then renamed). Returns ``path``."""
    with torch.device("meta"):
        model = SphinxX(config)
    model.assign_state(state, "cpu")
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(path)


def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike) -> Path:
    """The model of training checkpoint ``checkpoint`` as a ``save_pretrained`` directory
    ``output`` (with the tokenizer). ``FileNotFoundError`` when ``checkpoint`` is not a complete
    checkpoint; ``ValueError`` when it lacks the model configuration or the tokenizer."""
    checkpoint = Path(checkpoint)
    state = read_trainer_state(checkpoint)
    if "model_config" not in state:
        raise ValueError(f"checkpoint {str(checkpoint)!r} holds no model configuration (written by "
                         "an older sphinx-train); load it with the trainer and export from there")
    config = SphinxConfig.from_dict(state["model_config"])
    with torch.device("meta"):
        like = SphinxX(config).checkpoint_state()
    tokenizer = load_tokenizer(checkpoint, bos_id=config.llm.bos_token_id,
                               eos_id=config.llm.eos_token_id)
    return write_pretrained(load_model_state(checkpoint, like), config, tokenizer, output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sphinx-export",
        description="Write a sphinx-train checkpoint (any world size) as a SphinxX.save_pretrained "
                    "directory: config.json, safetensors weights and the tokenizer.")
    parser.add_argument("checkpoint", help="a checkpoint directory, e.g. OUTPUT/checkpoints/step-N")
    parser.add_argument("output", help="the directory to write (replaced if it exists)")
    args = parser.parse_args(argv)
    try:
        path = export_checkpoint(args.checkpoint, args.output)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    print(f"sphinx-export: wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
