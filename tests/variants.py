"""Inputs as an adversarial caller hands them in, and a way to run code that may crash.

Any strides are valid input (DESIGN.md): :func:`strided` and :func:`expanded` give views of a
tensor's values with other strides than a fresh tensor's, the gaps of a strided view filled with
values that give wrong results (or out-of-range indices) when read. :func:`same_bits` compares
results and inputs bit for bit, NaN included. A kernel that reads or writes out of bounds may end
the process: :func:`run_isolated` runs a function in a fresh interpreter, where a crash is a test
failure, not the end of the run.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ISOLATED_TIMEOUT_S = 600

# What the gaps of a strided view hold: far out of any index range, or NaN.
GAP_INDEX = 1 << 30
GAP_BOOL = True


def _gap(dtype: torch.dtype):
    if dtype == torch.bool:
        return GAP_BOOL
    if dtype.is_floating_point:
        return float("nan")
    return min(GAP_INDEX, torch.iinfo(dtype).max)


def strided(t: torch.Tensor, dim: int = 0, step: int = 2) -> torch.Tensor:
    """A view with ``t``'s values whose stride along ``dim`` is ``step`` times a contiguous one's,
    the entries in between set to a gap value (:data:`GAP_INDEX`, NaN). It requires grad when
    ``t`` does, as a view of a new buffer (``torch.autograd.grad`` gives its gradient)."""
    if t.dim() == 0:
        return t.detach().clone().requires_grad_(t.requires_grad)
    dim = dim % t.dim()
    shape = list(t.shape)
    shape[dim] *= step
    buffer = torch.full(shape, _gap(t.dtype), dtype=t.dtype, device=t.device)
    index = [slice(None)] * t.dim()
    index[dim] = slice(0, None, step)
    buffer[tuple(index)] = t.detach()
    return buffer.requires_grad_(t.requires_grad)[tuple(index)]


def expanded(value: torch.Tensor, shape) -> torch.Tensor:
    """``value`` (a tensor with size 1 along the broadcast dims) expanded to ``shape``: stride 0."""
    return value.expand(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` have one dtype, shape and the same bits (NaN equal to itself)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.detach().contiguous().view(bits), b.detach().contiguous().view(bits))
    return torch.equal(a, b)


def run_isolated(module: str, function: str, *args, timeout: float = ISOLATED_TIMEOUT_S) -> str:
    """Runs ``module.function(*args)`` (arguments as Python literals) in a fresh interpreter with
    this process's environment; fails the test if it does not exit cleanly (a crash, an exception,
    a timeout), naming the signal. Returns its standard output."""
    code = f"import {module} as m; m.{function}(*{args!r})"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                     os.environ.get("PYTHONPATH")])))
    try:
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{module}.{function}{args!r} did not finish in {timeout} s:\n"
                    f"{(error.stdout or '')[-4000:]}")
    if result.returncode != 0:
        how = (f"killed by {signal.Signals(-result.returncode).name}" if result.returncode < 0
               else f"exit code {result.returncode}")
        pytest.fail(f"{module}.{function}{args!r} in a fresh interpreter: {how}\n"
                    f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}")
    return result.stdout
