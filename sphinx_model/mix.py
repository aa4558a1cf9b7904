"""``sphinx-mix``: weight mixing of two checkpoints of one architecture, as SPHINX mixes LLMs trained on
different data.

    sphinx-mix runs/a/final runs/b/final --beta 0.5 --output runs/mixed
    python -m sphinx_model.mix ...                                        # the same

Every weight of the output is ``beta * A + (1 - beta) * B``, computed in float64 and rounded once to
A's dtype (so a checkpoint mixed with itself, and ``--beta 1``, give A back bit for bit). A and B are
directories of safetensors weights (``model.safetensors`` or shards with an index): two
``SphinxX.save_pretrained`` directories or two Hugging Face LLM directories. Their keys and shapes
must match exactly; a mismatch is refused naming the keys. Integer tensors must be equal. The
output holds the mixed weights and a copy of A's other files (``config.json``, the tokenizer, ...),
written to a temporary directory and renamed into place.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

from sphinx_model.checkpoints import (
    SAFE_INDEX,
    SafetensorsDir,
    atomic_directory,
    write_safetensors,
)

__all__ = ["main", "mix_checkpoints", "mix_tensors"]

PROG = "sphinx-mix"
_SHOWN = 5  # mismatched keys named in an error


def mix_tensors(a: torch.Tensor, b: torch.Tensor, beta: float, key: str = "tensor") -> torch.Tensor:
    """``beta * a + (1 - beta) * b`` in float64, in ``a``'s dtype; equal tensors (and ``beta`` 1 or
    0) give an input back unchanged. Integer tensors must be equal."""
    if torch.equal(a, b) or beta == 1:
        return a
    if not a.is_floating_point() or not b.is_floating_point():
        raise ValueError(f"{key}: integer tensors differ between the checkpoints; only floating "
                         "weights are mixed")
    if beta == 0:
        return b.to(a.dtype)
    return (beta * a.double() + (1 - beta) * b.double()).to(a.dtype)


def mix_checkpoints(a: str | os.PathLike, b: str | os.PathLike, beta: float,
                    output: str | os.PathLike) -> Path:
    """Writes the mix of checkpoint directories ``a`` and ``b`` (module docstring) to ``output``;
    returns its path."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or \
            not 0 <= beta <= 1:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    a, b, output = Path(a), Path(b), Path(output)
    for name, path in (("A", a), ("B", b)):
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {name} {path}: no such directory")
    if output.resolve() in (a.resolve(), b.resolve()):
        raise ValueError(f"--output {output} must differ from the checkpoints it mixes")
    tensors_a, tensors_b = SafetensorsDir(a), SafetensorsDir(b)
    _check_same_keys(tensors_a, tensors_b, a, b)
    mixed = {}
    for key in tensors_a:
        ta, tb = tensors_a[key], tensors_b[key]
        if ta.shape != tb.shape:
            raise ValueError(f"{key}: shape {tuple(ta.shape)} in {a} but {tuple(tb.shape)} in {b} "
                             "(checkpoints of different architectures are not mixed)")
        mixed[key] = mix_tensors(ta, tb, beta, key)
    weight_files = {"model.safetensors", SAFE_INDEX} | {
        p.name for p in a.iterdir() if p.name.endswith(".safetensors")}
    with atomic_directory(output) as tmp:
        write_safetensors(mixed, tmp)
        for source in sorted(a.iterdir()):
            if source.is_file() and source.name not in weight_files:
                shutil.copy2(source, tmp / source.name)
    return output


def _check_same_keys(tensors_a, tensors_b, a: Path, b: Path) -> None:
    only_a, only_b = sorted(set(tensors_a) - set(tensors_b)), sorted(set(tensors_b) - set(tensors_a))
    if only_a or only_b:
        parts = [f"only in {path}: {_names(keys)}" for path, keys in ((a, only_a), (b, only_b))
                 if keys]
        raise ValueError("the checkpoints hold different keys (not one architecture); "
                         + "; ".join(parts))


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Mix two checkpoints of one architecture: "
                               "beta * A + (1 - beta) * B for every weight.")
    parser.add_argument("a", help="checkpoint directory A (safetensors)")
    parser.add_argument("b", help="checkpoint directory B (same keys and shapes)")
    parser.add_argument("--beta", type=float, default=0.5, help="weight of A, in [0, 1] "
                                                                "(default 0.5)")
    parser.add_argument("--output", required=True, help="the mixed checkpoint's directory")
    args = parser.parse_args(argv)
    try:
        path = mix_checkpoints(args.a, args.b, args.beta, args.output)
    except (OSError, ValueError, TypeError, SafetensorError) as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    print(f"{PROG}: wrote {path} = {args.beta:g} * {args.a} + {1 - args.beta:g} * {args.b}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
