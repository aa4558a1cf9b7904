"""``kernel_op``: an op's ``torch.library`` custom op, called directly where nothing would see it.

Every op of the library is a ``torch.library.custom_op``, so that autograd, ``torch.compile``,
FakeTensor tracing, dispatch modes (``FlopCounterMode``, selective activation checkpointing, ...),
functorch transforms and tensor subclasses (DTensor) each see one opaque op with a fake
implementation. Going through the dispatcher costs 20-30 us of Python per call (measured on a
2-core x86-64 CPU, torch 2.14: a custom op returning an empty tensor, against its function called
directly): 3-10% of a tiny Mixtral's CPU decode step in interleaved runs (seven ops a layer).

When none of those can be involved, :class:`KernelOp` calls the op's function itself instead: the
same function the custom op would run, with the same arguments, so the results are the same. That
is when no gradient is being recorded for the call, nothing is compiling, no dispatch mode, torch
function mode (``with torch.device(...)`` is one), functorch transform or autocast is active, and
every tensor argument (lists of tensors included) is a plain ``torch.Tensor`` or ``nn.Parameter``
on the CPU or a CUDA device. Every other call goes through the custom op.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch._library.custom_ops import CustomOpDef

__all__ = ["KernelOp", "kernel_op", "calls_directly"]

_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain_and_untracked(values, recording: bool) -> bool:
    # Plain loops, no generators: this runs on every op call of a decode step.
    for value in values:
        if isinstance(value, torch.Tensor):
            if (type(value) not in _PLAIN_TENSOR_TYPES or not (value.is_cpu or value.is_cuda)
                    or (recording and value.requires_grad)):
                return False
        elif isinstance(value, (list, tuple)) and not _plain_and_untracked(value, recording):
            return False
    return True


def calls_directly(args: tuple) -> bool:
    """Whether a call with ``args`` may run the op's function without the dispatcher (see the
    module docstring)."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._len_torch_function_stack() or torch._C._is_any_autocast_enabled()
            or torch._C._functorch.peek_interpreter_stack() is not None):
        return False
    return _plain_and_untracked(args, torch.is_grad_enabled())


class KernelOp:
    """A custom op and the function it was made from; calling it picks one (:func:`calls_directly`).
    ``register_fake`` and ``register_autograd`` are the custom op's."""

    def __init__(self, op: CustomOpDef, function: Callable[..., Any]):
        self.op, self.function = op, function
        self.register_fake = op.register_fake
        self.register_autograd = op.register_autograd

    def __call__(self, *args, **kwargs):
        direct = calls_directly(args + tuple(kwargs.values()))
        return (self.function if direct else self.op)(*args, **kwargs)


def kernel_op(name: str) -> Callable[[Callable[..., Any]], KernelOp]:
    """Decorator: ``torch.library.custom_op(name, mutates_args=())`` (every op of the library is
    functional) as a :class:`KernelOp`."""
    def wrap(function: Callable[..., Any]) -> KernelOp:
        return KernelOp(torch.library.custom_op(name, mutates_args=())(function), function)

    return wrap
