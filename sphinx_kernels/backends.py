"""The backend registry: which implementation serves an op call, and why the others cannot.

Every public op has several backends, tried in priority order: the compiled kernel (``cuda`` on a
GPU, ``cpp`` on the CPU), the ``triton`` kernel, installed peer libraries where one fits, and the
pure-PyTorch ``reference``, which serves everything. A :class:`Backend` is an :class:`Impl` (the
forward, the backward when the op has one, named extras), the :class:`Platform` it runs on (devices,
minimum compute capability, whether it is installed) and what it supports for one op (dtypes and an
op-specific check of the op's request); :meth:`Backend.not_supported_reasons` turns that into plain
reasons.

Each op's table (an :class:`OpBackends`) owns the op's request type: a frozen :class:`Request`, or a
subclass with one field per feature its backends differ on, built only by
:meth:`OpBackends.request`, which the op, the tests, the benchmarks and ``python -m
sphinx_kernels.info`` all call.

The choice is made per call, from tensor metadata only (no host synchronisation, so it also runs
while ``torch.compile`` traces). ``backend=`` on the call forces one; so does the environment
variable ``SPHINX_KERNELS_BACKEND``, either one name for every op (``triton``) or per op
(``gather_rows=cpp,varlen_attention=triton``). When the forced backend, or every backend, cannot
serve a call, :class:`BackendUnavailableError` lists each backend with its reasons.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from sphinx_kernels.dtypes import FLOAT_DTYPES, dtype_name
from sphinx_kernels.platforms import (
    CPP,
    CPU_REFERENCE,
    CUDA,
    REFERENCE,
    TRITON,
    Platform,
    native,
    native_extension,
    native_ops,
    triton_interpreted,
    triton_launcher,
    triton_module,
)

# The platforms are re-exported: they were defined here before sphinx_kernels.platforms.
__all__ = ["ENV_BACKEND", "BackendUnavailableError", "Request", "Platform", "Impl", "Backend",
           "OpBackends", "forced_backend", "native_extension", "native_ops", "native",
           "triton_interpreted", "triton_module", "triton_launcher", "CUDA", "CPP", "TRITON",
           "REFERENCE", "CPU_REFERENCE", "FLOAT_DTYPES"]

ENV_BACKEND = "SPHINX_KERNELS_BACKEND"


class BackendUnavailableError(ValueError):
    """No backend (or not the forced one) can serve a call; the message lists every backend's
    reasons."""


@dataclass(frozen=True)
class Request:
    """What one op call needs, from metadata only: the device and the main input's dtype.

    Ops whose backends differ in more than that declare a subclass with one field per feature (a
    frozen dataclass: a misspelled feature is a TypeError, never a silently approved backend), and
    build it with their table's :meth:`OpBackends.request`."""

    device: torch.device
    dtype: torch.dtype

    def describe(self) -> str:
        extra = "".join(f", {f.name}={getattr(self, f.name)}" for f in fields(self)[2:])
        return f"device={self.device.type}, dtype={dtype_name(self.dtype)}{extra}"


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op: the forward, the backward when the op has one, and
    named extras (e.g. ``moe_unpermute``'s ``pair_dots``, its weights' backward).

    Each op's custom op calls them with keyword arguments named as in the op's docstring of its
    table, so every backend's functions take the same parameters."""

    forward: Callable[..., Any]
    backward: Callable[..., Any] | None = None
    extras: Mapping[str, Callable[..., Any]] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "extras", MappingProxyType(dict(self.extras)))

    def extra(self, name: str) -> Callable[..., Any]:
        if name not in self.extras:
            raise KeyError(f"this implementation has no {name!r}; it has {sorted(self.extras)}")
        return self.extras[name]


@dataclass(frozen=True)
class Backend:
    """One implementation of one op: a platform, the dtypes it takes, and an op-specific check of
    the op's request type."""

    platform: Platform
    impl: Impl
    dtypes: frozenset[torch.dtype]
    check: Callable[[Any], Iterable[str]] | None = None

    @property
    def name(self) -> str:
        return self.platform.name

    def supports(self, request: Request) -> bool:
        """``not self.not_supported_reasons(request)``, stopping at the first refusal and building
        no message: what selection asks on every op call (the reasons are for errors and
        ``info``)."""
        return (request.dtype in self.dtypes and self.platform.runs_on(request.device)
                and (self.check is None or not self.check(request)))

    def not_supported_reasons(self, request: Request) -> list[str]:
        reasons = self.platform.not_supported_reasons(request.device)
        if request.dtype not in self.dtypes:
            names = ", ".join(sorted(dtype_name(d) for d in self.dtypes))
            reasons.append(f"dtype {dtype_name(request.dtype)} not in {{{names}}}")
        if self.check is not None:
            reasons.extend(self.check(request))
        return reasons


class OpBackends:
    """The backends of one op, in priority order, and the op's request type."""

    def __init__(self, op: str, backends: Sequence[Backend], request_type: type[Request] = Request):
        names = [b.name for b in backends]
        if len(set(names)) != len(names):
            raise ValueError(f"{op}: backend names must be unique, got {names}")
        self.op = op
        self.backends = tuple(backends)
        self.names = tuple(names)
        self.request_type = request_type
        self._by_name = dict(zip(names, self.backends))

    def request(self, device: torch.device | str, dtype: torch.dtype, **features) -> Request:
        """The op's request: what the op builds per call, and what tests, benchmarks and ``info``
        probe the backends with. ``features`` are the request type's fields (TypeError for any
        other name); those not given take the type's defaults (a typical training call)."""
        if not isinstance(device, torch.device):
            device = torch.device(device)
        return self.request_type(device, dtype, **features)

    def available(self, request: Request) -> list[str]:
        """The names of the backends that can serve ``request`` here, in priority order."""
        return [b.name for b in self.backends if b.supports(request)]

    def __getitem__(self, name: str) -> Backend:
        if name not in self._by_name:
            raise KeyError(f"{self.op} has no backend {name!r}; it has {', '.join(self.names)}")
        return self._by_name[name]

    def reasons(self, request: Request) -> dict[str, list[str]]:
        """Every backend's reasons for not serving ``request`` (an empty list: it can)."""
        if type(request) is not self.request_type:
            raise TypeError(f"{self.op} takes a {self.request_type.__name__} (built by "
                            f"{self.op.upper()}_BACKENDS.request), got {type(request).__name__}")
        return {b.name: b.not_supported_reasons(request) for b in self.backends}

    def select(self, request: Request, backend: str | None = None) -> Backend:
        """The backend that serves ``request``: the forced one, else the first that supports it."""
        if type(request) is not self.request_type:
            self.reasons(request)  # raises the TypeError
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
        forced = backend if backend is not None else forced_backend(self.op)
        if forced is None:
            for candidate in self.backends:
                if candidate.supports(request):
                    return candidate
        elif forced not in self._by_name:
            raise BackendUnavailableError(
                f"{self.op}: unknown backend {forced!r} (from "
                f"{'backend=' if backend is not None else ENV_BACKEND}); "
                f"this op has {', '.join(self.names)}")
        elif self._by_name[forced].supports(request):
            return self._by_name[forced]
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
