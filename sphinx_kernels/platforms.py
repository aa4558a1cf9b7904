"""Platforms: where a kind of implementation runs (devices, minimum GPU capability, whether it is
installed here) and how its code is loaded.

The compiled extension (``sphinx_kernels._C``: the ``cuda`` and ``cpp`` platforms) and the Triton
kernels (``sphinx_kernels.triton.<op>``: the ``triton`` platform) are loaded on first use, never at
import, and never touch CUDA before a call does: the package imports without a GPU, without the
extension and without Triton. The registry (:mod:`sphinx_kernels.backends`) pairs a platform with
an op's implementation.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["Platform", "CUDA", "CPP", "TRITON", "REFERENCE", "CPU_REFERENCE", "native_extension",
           "native_ops", "native", "triton_interpreted", "triton_module", "triton_launcher"]


@dataclass(frozen=True)
class Platform:
    """Where a kind of implementation can run at all: devices, minimum GPU capability,
    installation."""

    name: str
    devices: frozenset[str]
    min_capability: tuple[int, int] | None
    missing: Callable[[torch.device], str | None]  # why it cannot run on this device here, or None

    def runs_on(self, device: torch.device) -> bool:
        """``not self.not_supported_reasons(device)``, without formatting a reason for a device of
        another kind (the common refusal: backend selection asks on every op call)."""
        return device.type in self.devices and not self.not_supported_reasons(device)

    def not_supported_reasons(self, device: torch.device) -> list[str]:
        kind = device.type
        if kind not in self.devices:
            return [f"runs on {'/'.join(sorted(self.devices))}, not {kind}"]
        why = self.missing(device)
        if why:
            return [why]
        if kind == "cuda" and self.min_capability:
            have = _capability(device)
            if have < self.min_capability:
                need = ".".join(map(str, self.min_capability))
                return [f"needs compute capability {need}, the GPU has {have[0]}.{have[1]}"]
        return []


# Plain memo dicts, not functools caches: selection runs while torch.compile traces, and Dynamo
# traces through cache wrappers with a warning.
_CAPABILITIES: dict[torch.device, tuple[int, int]] = {}
_LOADED: dict[str, Any] = {}


def _capability(device: torch.device) -> tuple[int, int]:
    if device not in _CAPABILITIES:
        _CAPABILITIES[device] = torch.cuda.get_device_capability(device)
    return _CAPABILITIES[device]


def native_extension():
    """The compiled module ``sphinx_kernels._C`` (importing it registers its ops), or None."""
    if "_C" not in _LOADED:
        try:
            from sphinx_kernels import _C
        except ImportError:
            _C = None
        _LOADED["_C"] = _C
    return _LOADED["_C"]


def native_ops():
    """``torch.ops.sphinx_kernels``, with the compiled ``*_native`` ops registered (for the cpp and
    cuda backends, which are only chosen when the extension is built)."""
    native_extension()  # importing _C registers torch.ops.sphinx_kernels.*_native
    return torch.ops.sphinx_kernels


def _native_missing(device: torch.device) -> str | None:
    ext = native_extension()
    if ext is None:
        return "sphinx_kernels._C is not built (pip install -e . --no-build-isolation)"
    if device.type == "cuda" and not ext.with_cuda:
        return "sphinx_kernels._C was built without CUDA kernels"
    return None


def triton_interpreted() -> bool:
    """Whether Triton kernels run under the interpreter (set before the package is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_installed() -> bool:
    # Looked up once: find_spec searches sys.path for a module not yet imported (~50 us), and the
    # backend choice asks on every op call.
    if "triton_installed" not in _LOADED:
        _LOADED["triton_installed"] = importlib.util.find_spec("triton") is not None
    return _LOADED["triton_installed"]


def _triton_missing(device: torch.device) -> str | None:
    if not _triton_installed():
        return "triton is not installed"
    if device.type == "cpu" and not triton_interpreted():
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    if device.type == "cuda" and triton_interpreted():
        return "TRITON_INTERPRET=1 is set: Triton kernels take CPU tensors only"
    return None


CUDA = Platform("cuda", frozenset({"cuda"}), (8, 0), _native_missing)
CPP = Platform("cpp", frozenset({"cpu"}), None, _native_missing)
TRITON = Platform("triton", frozenset({"cuda", "cpu"}), (8, 0), _triton_missing)
REFERENCE = Platform("reference", frozenset({"cuda", "cpu"}), None, lambda device: None)
# The reference of an op that prepares data on the CPU (in the data loader) and nowhere else.
CPU_REFERENCE = Platform("reference", frozenset({"cpu"}), None, lambda device: None)


# ----------------------------------------------------------------------------------------------
# Implementations behind a lazy load: what an Impl holds for the compiled ops and the Triton
# launchers.


def native(op_name: str) -> Callable[..., Any]:
    """A function that calls the compiled ``torch.ops.sphinx_kernels.<op_name>`` (loading ``_C`` on
    its first call) with the arguments it is given."""
    def call(*args, **kwargs):
        return getattr(native_ops(), op_name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = op_name
    return call


def triton_module(name: str):
    """``sphinx_kernels.triton.<name>``, imported on first use: Triton reads ``TRITON_INTERPRET``
    when a kernel is defined, and the package must import without Triton."""
    return importlib.import_module(f"sphinx_kernels.triton.{name}")


def triton_launcher(module: str, function: str) -> Callable[..., Any]:
    """A function that calls ``sphinx_kernels.triton.<module>.<function>`` (imported on its first
    call)."""
    def call(*args, **kwargs):
        return getattr(triton_module(module), function)(*args, **kwargs)

    call.__name__ = call.__qualname__ = f"{module}.{function}"
    return call
