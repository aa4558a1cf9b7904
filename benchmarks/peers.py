"""The peers the benchmarks compare against, and why any of them is skipped on this machine.

Each benchmark uses a peer only when :func:`peer_missing` returns None for the device; every run
prints the skipped peers with their reasons and stores the whole table in its results file, so a
missing baseline is never silent.

A peer that is not installed on the GPU machine can be carried there as a wheel: download it on a
machine with network access for the GPU machine's Python (``pip download --no-deps
--only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d wheels
NAME==VERSION``), copy the folder along, and install it there with ``pip install --no-index
--no-deps --target /tmp/site wheels/*.whl`` and ``PYTHONPATH=/tmp/site``. flash-attn and megablocks
publish no generic wheels (they compile CUDA at install): build their wheel once on a machine with
the same torch and CUDA, then carry that.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Callable

import torch


def _module_missing(name: str, package: str | None = None) -> str | None:
    if importlib.util.find_spec(name) is None:
        return f"{package or name} is not installed"
    return None


def _on_gpu(device: torch.device, min_capability: tuple[int, int] = (8, 0)) -> str | None:
    if device.type != "cuda":
        return "GPU only"
    if torch.cuda.get_device_capability(device) < min_capability:
        return f"needs compute capability {min_capability[0]}.{min_capability[1]}"
    return None


def _has_attribute(module: str, attribute: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), attribute)
    except ImportError:
        return False


def _torch_flash_varlen(device):
    # torch's bundled FlashAttention-2 varlen kernel, public from torch 2.10.
    if not _has_attribute("torch.nn.attention.varlen", "varlen_attn"):
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    return _on_gpu(device)


def _flex_attention(device):
    if not _has_attribute("torch.nn.attention.flex_attention", "flex_attention"):
        return f"torch {torch.__version__} has no FlexAttention"
    return _on_gpu(device)  # its CPU path exists but is not what users would benchmark


def _grouped_mm(device):
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    # Per its notes the fast CUTLASS path is bf16 on sm90 and newer; elsewhere it loops over groups.
    return _on_gpu(device, (9, 0))


PEERS: dict[str, Callable[[torch.device], str | None]] = {
    "torch.compile": lambda device: None,
    # transformers' own Llama rotary, attention and Mixtral MoE block
    # (benchmarks.transformers_baselines)
    "transformers": lambda device: _module_missing("transformers"),
    "torch_flash_varlen": _torch_flash_varlen,
    "flex_attention": _flex_attention,
    "torch._grouped_mm": _grouped_mm,
    "flash_attn": lambda device: _module_missing("flash_attn", "flash-attn") or _on_gpu(device),
    "xformers": lambda device: _module_missing("xformers") or _on_gpu(device),
    "megablocks": lambda device: _module_missing("megablocks") or _on_gpu(device),
}


def peer_missing(name: str, device: torch.device) -> str | None:
    """Why peer ``name`` cannot be benchmarked on ``device`` here, or None when it can."""
    return PEERS[name](device)


def peer_status(device: torch.device) -> dict[str, str]:
    """Every peer: ``"available"`` or the reason it is skipped."""
    return {name: peer_missing(name, device) or "available" for name in PEERS}
