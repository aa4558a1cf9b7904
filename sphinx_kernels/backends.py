"""The backend registry: which implementation serves an op call, and why the others cannot.

Every public op has several backends, tried in priority order: the compiled kernel (``cuda`` on a GPU,
``cpp`` on the CPU), the ``triton`` kernel, installed peer libraries where one fits, and the pure-PyTorch
``reference``, which serves everything. A backend declares where it can run (a :class:`Platform`:
devices, minimum compute capability, whether it is installed) and what it supports for one op (dtypes
and an op-specific check); :meth:`Backend.not_supported_reasons` turns that into plain reasons.

The choice is made per call, from tensor metadata only (no host synchronisation, so it also runs while
``torch.compile`` traces). ``backend=`` on the call forces one; so does the environment variable
``SPHINX_KERNELS_BACKEND``, either one name for every op (``triton``) or per op
(``gather_rows=cpp,varlen_attention=triton``). When the forced backend, or every backend, cannot serve a
call, :class:`BackendUnavailableError` lists each backend with its reasons.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

ENV_BACKEND = "SPHINX_KERNELS_BACKEND"


class BackendUnavailableError(ValueError):
    """No backend (or not the forced one) can serve a call; the message lists every backend's reasons."""


@dataclass(frozen=True)
class Request:
    """What one op call needs, from metadata only: device, dtype and op-specific features."""

    device: torch.device
    dtype: torch.dtype
    features: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.features.items())
        return f"device={self.device.type}, dtype={str(self.dtype).removeprefix('torch.')}{extra}"


@dataclass(frozen=True)
class Platform:
    """Where a kind of implementation can run at all: devices, minimum GPU capability, installation."""

    name: str
    devices: frozenset[str]
    min_capability: tuple[int, int] | None
    missing: Callable[[torch.device], str | None]  # why it cannot run on this device here, or None

    def not_supported_reasons(self, device: torch.device) -> list[str]:
        if device.type not in self.devices:
            return [f"runs on {'/'.join(sorted(self.devices))}, not {device.type}"]
        reasons = []
        why = self.missing(device)
        if why:
            reasons.append(why)
        if device.type == "cuda" and self.min_capability and not why:
            have = _capability(device)
            if have < self.min_capability:
                need = ".".join(map(str, self.min_capability))
                reasons.append(f"needs compute capability {need}, the GPU has {have[0]}.{have[1]}")
        return reasons


@dataclass(frozen=True)
class Backend:
    """One implementation of one op: a platform, the dtypes it takes, and an op-specific check."""

    platform: Platform
    impl: Any
    dtypes: frozenset[torch.dtype]
    check: Callable[[Request], Iterable[str]] | None = None

    @property
    def name(self) -> str:
        return self.platform.name

    def not_supported_reasons(self, request: Request) -> list[str]:
        reasons = self.platform.not_supported_reasons(request.device)
        if request.dtype not in self.dtypes:
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in self.dtypes))
            reasons.append(f"dtype {str(request.dtype).removeprefix('torch.')} not in {{{names}}}")
        if self.check is not None:
            reasons.extend(self.check(request))
        return reasons


class OpBackends:
    """The backends of one op, in priority order."""

    def __init__(self, op: str, backends: Sequence[Backend]):
        names = [b.name for b in backends]
        if len(set(names)) != len(names):
            raise ValueError(f"{op}: backend names must be unique, got {names}")
        self.op = op
        self.backends = tuple(backends)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.backends)

    def __getitem__(self, name: str) -> Backend:
        for candidate in self.backends:
            if candidate.name == name:
                return candidate
        raise KeyError(f"{self.op} has no backend {name!r}; it has {', '.join(self.names)}")

    def reasons(self, request: Request) -> dict[str, list[str]]:
        """Every backend's reasons for not serving ``request`` (an empty list: it can)."""
        return {b.name: b.not_supported_reasons(request) for b in self.backends}

    def select(self, request: Request, backend: str | None = None) -> Backend:
        """The backend that serves ``request``: the forced one, else the first that supports it."""
        forced = backend if backend is not None else forced_backend(self.op)
        if forced is not None and forced not in self.names:
            raise BackendUnavailableError(
                f"{self.op}: unknown backend {forced!r} (from "
                f"{'backend=' if backend is not None else ENV_BACKEND}); "
                f"this op has {', '.join(self.names)}")
        for candidate in self.backends:
            if forced is not None and candidate.name != forced:
                continue
            if not candidate.not_supported_reasons(request):
                return candidate
        head = (f"{self.op}: backend {forced!r} cannot serve this call" if forced else
                f"{self.op}: no backend can serve this call")
        lines = [f"{head} ({request.describe()})."]
        for name, why in self.reasons(request).items():
            lines.append(f"  {name}: {'; '.join(why) if why else 'available'}")
        raise BackendUnavailableError("\n".join(lines))


def forced_backend(op: str) -> str | None:
    """The backend that ``SPHINX_KERNELS_BACKEND`` forces for ``op``, if any."""
    value = os.environ.get(ENV_BACKEND, "").strip()
    if not value:
        return None
    if "=" not in value:
        return value
    for item in value.split(","):
        name, _, chosen = item.partition("=")
        if name.strip() == op:
            return chosen.strip()
    return None


# Plain memo dicts, not functools caches: selection runs while torch.compile traces, and Dynamo
# traces through cache wrappers with a warning.
_CAPABILITIES: dict[torch.device, tuple[int, int]] = {}
_LOADED: dict[str, Any] = {}


def _capability(device: torch.device) -> tuple[int, int]:
    if device not in _CAPABILITIES:
        _CAPABILITIES[device] = torch.cuda.get_device_capability(device)
    return _CAPABILITIES[device]


# ---------------------------------------------------------------------------------------------------
# The compiled extension and Triton: loaded on first use, never at import (and never touching CUDA).


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


def _triton_missing(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
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

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
