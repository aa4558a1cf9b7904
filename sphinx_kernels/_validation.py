"""Input checks shared by every op: they run before any launch and name the argument at fault.

Metadata (types, dtypes, shapes, devices) is always checked. Index *values* (ranges, monotonic
offsets) are checked when the tensors are on the CPU, where it is free; on a GPU reading them back
would cost a host synchronisation per call, so there they are checked only with
``SPHINX_KERNELS_CHECK_INPUTS=1`` (a debugging switch, like ``CUDA_LAUNCH_BLOCKING``), and the
kernels stay in bounds regardless. Value checks are skipped while ``torch.compile`` traces (the
values are not known then).

A value check that passed is remembered for the tensors it read, as long as they stay unmodified
(:func:`values_checked` / :func:`mark_values_checked`): a decode step hands every layer the same
``cu_seqlens`` and position ids, and ``moe_permute``, ``moe_expert_mlp`` and ``moe_unpermute`` the
same routing plan, and reading them back once per op call cost about 8% of a tiny model's CPU decode
step. Only writes that torch counts (the tensor's version counter: in-place ops on it or on a view
of it) make a tensor "modified"; writes through ``.data``, NumPy or raw pointers are not seen, as
autograd does not see them either. Inference tensors have no version counter and are checked on
every call. A missed write costs a clear error message, never memory safety: the kernels stay in
bounds whatever the values.
"""
from __future__ import annotations

import math
import os
import weakref
from typing import Collection, Hashable

import numpy as np
import torch

from sphinx_kernels.dtypes import INDEX_DTYPES, dtype_name

__all__ = ["ENV_CHECK_INPUTS", "INDEX_DTYPES", "INT32_MAX", "dtype_name", "require_tensor",
           "require_device", "require_int", "require_bool", "require_float",
           "require_unit_stride", "should_check_values", "host_values", "require_index_range",
           "values_checked", "mark_values_checked", "mark_index_range_checked"]

ENV_CHECK_INPUTS = "SPHINX_KERNELS_CHECK_INPUTS"
# The largest size an int32 row index or offset holds: the bound of every size that becomes one.
INT32_MAX = 2**31 - 1


def require_tensor(name: str, value, *, dims: int | None = None,
                   dtypes: Collection[torch.dtype] | None = None) -> torch.Tensor:
    """``value`` as a tensor of ``dims`` dimensions and one of ``dtypes``, else TypeError /
    ValueError."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = ", ".join(sorted(map(dtype_name, dtypes)))  # one message whatever the set's order
        raise TypeError(f"{name} must have dtype {allowed}; got {dtype_name(value.dtype)}")
    if dims is not None and value.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(value.shape)}")
    return value


def require_device(name: str, value: torch.Tensor, device: torch.device, other: str) -> None:
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but {other} is on {device}; "
                         "all tensors of one call must be on one device")


def require_int(name: str, value, *, minimum: int | None = None,
                maximum: int | None = None) -> int:
    """``value`` as a Python int (not a bool) in ``[minimum, maximum]``, else TypeError /
    ValueError. Python ints have no bound of their own: ``maximum`` keeps a size from wrapping
    in the int64 (or int32) arithmetic it feeds."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def require_bool(name: str, value) -> bool:
    """``value`` as a bool (not an int, not None), else TypeError."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def require_float(name: str, value, *, minimum: float | None = None,
                  optional: bool = False) -> float | None:
    """``value`` (an int or a float, not a bool; None if ``optional``) as a finite Python float of
    at least ``minimum``, else TypeError / ValueError (an int too large for a float included)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shown = repr(value) if len(repr(value)) <= 40 else type(value).__name__
        raise TypeError(f"{name} must be {'None or ' if optional else ''}a float, got {shown}")
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result) or (minimum is not None and result < minimum):
        bound = "" if minimum is None else f" >= {minimum:g}"
        shown = f"{result!r}" if math.isfinite(result) or isinstance(value, float) else (
            f"an int of {value.bit_length()} bits")
        raise ValueError(f"{name} must be a finite float{bound}, got {shown}")
    return result


def require_unit_stride(name: str, value: torch.Tensor, axis: str = "its last dimension") -> None:
    """The kernels read rows along the last dimension contiguously: a unit stride there (any other
    strides) is required, and copying is left to the caller, who sees the cost."""
    if value.shape[-1] > 1 and value.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride along {axis} (strides "
                         f"{tuple(value.stride())}); pass .contiguous() explicitly")


def should_check_values(*tensors: torch.Tensor) -> bool:
    """Whether to read index values back for validation (see the module docstring)."""
    if torch.compiler.is_compiling():
        return False
    # CPU values are always checked: the environment (a dict lookup and a string encoding, a few
    # microseconds on every op call of a decode step) is read only for GPU tensors.
    return all(t.device.type == "cpu" for t in tensors) or os.environ.get(ENV_CHECK_INPUTS) == "1"


def host_values(values: torch.Tensor) -> np.ndarray:
    """An index tensor's values on the host, to check (once :func:`should_check_values` allows):
    a view of a CPU tensor's memory (no copy), one copy back from a GPU. A few NumPy operations on
    it cost a few microseconds where the same torch operations cost tens (each is a dispatch), which
    matters for the small ops of a decode step."""
    return values.detach().cpu().numpy()


# (check, its parameters, (id, version) of each tensor) -> weak references to the tensors, which
# tell a live tensor from a new one that reuses a dead one's id. Every in-place op bumps the version
# (resize_ and set_ included). Bounded: when full, the entries of dead tensors go (most of them: a
# decode step's indices die with the step), and all of them if that frees nothing.
_CHECKED: dict[tuple, tuple[weakref.ref, ...]] = {}
_CHECKED_CAPACITY = 256


def _check_key(check: Hashable, tensors: tuple[torch.Tensor, ...]) -> tuple | None:
    stamps = []
    for t in tensors:
        if t.is_inference():
            return None  # no version counter: an in-place write would go unseen
        stamps.append((id(t), t._version))
    return check, tuple(stamps)


def values_checked(check: Hashable, *tensors: torch.Tensor) -> bool:
    """Whether ``tensors`` (these objects, unmodified since) passed the value check ``check`` (a
    hashable naming the check and every parameter it depends on, such as bounds)."""
    key = _check_key(check, tensors)
    refs = None if key is None else _CHECKED.get(key)
    return refs is not None and all(ref() is t for ref, t in zip(refs, tensors))


def mark_values_checked(check: Hashable, *tensors: torch.Tensor) -> None:
    """Remembers that ``tensors`` passed ``check`` (see :func:`values_checked`)."""
    key = _check_key(check, tensors)
    if key is None:
        return
    if len(_CHECKED) >= _CHECKED_CAPACITY:
        dead = [k for k, refs in _CHECKED.items() if any(ref() is None for ref in refs)]
        for k in dead:
            del _CHECKED[k]
        if not dead:
            _CHECKED.clear()
    _CHECKED[key] = tuple(weakref.ref(t) for t in tensors)


def _index_range_check(lowest: int, bound: int) -> tuple:
    return ("index_range", lowest, bound)


def mark_index_range_checked(values: torch.Tensor, bound: int, *, lowest: int = 0) -> None:
    """Records that ``values`` lie in ``[lowest, bound)`` without reading them: for an op's output
    that is in range by construction (its inputs checked), so that the ops it feeds skip
    :func:`require_index_range`'s read-back."""
    mark_values_checked(_index_range_check(lowest, bound), values)


def require_index_range(name: str, values: torch.Tensor, bound: int, bound_name: str,
                        source: str | None = None, *, lowest: int = 0,
                        checked: bool = False) -> None:
    """Index ``values`` must lie in ``[lowest, bound)`` (``lowest`` -1 where -1 marks "none");
    read back only where :func:`should_check_values` allows (a host sync on a GPU; ``checked``:
    the caller has asked it). ``bound_name`` names the bound in the message, ``source`` where it
    comes from."""
    if not values.numel() or not (checked or should_check_values(values)):
        return
    check = _index_range_check(lowest, bound)
    if values_checked(check, values):
        return
    host = host_values(values)
    if host.size <= 32:  # a decode step's few indices: Python's min and max of a list beat two
        flat = host.ravel().tolist()  # NumPy reductions (a few microseconds each)
        low, high = min(flat), max(flat)
    else:
        low, high = int(host.min()), int(host.max())
    if low < lowest or high >= bound:
        where = f" ({source})" if source else ""
        raise ValueError(f"{name} must be in [{lowest}, {bound_name}) = [{lowest}, {bound})"
                         f"{where}, got values in [{low}, {high}]")
    mark_values_checked(check, values)
