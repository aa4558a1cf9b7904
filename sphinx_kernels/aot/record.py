"""Recording the Triton launches of the public ops on a GPU that is not there.

The ops run under a ``FakeTensorMode`` on fake ``cuda`` tensors (shapes, strides and dtypes, no
data), with the device's capability and properties answered for the target, so the backend registry
picks the Triton backend and every launcher takes its GPU branch. Three things stand in for the GPU:

* custom ops: under a fake mode a ``torch.library`` op would run its fake implementation; a dispatch
  mode runs its real Python implementation instead, and, when an input requires grad, the op's
  registered backward straight after, with gradient stand-ins shaped like the outputs (the autograd
  engine itself cannot run on fake CUDA tensors without a device);
* ``JITFunction.run``: a launch is specialised exactly as Triton's launcher does it (Triton's own
  binder and ``_pack_args`` with the target's backend: argument types, 16-byte pointer alignment,
  integer divisibility by 16 and ``== 1``, constexprs, options) and recorded, never compiled or run;
* tensors reaching the binder: a stand-in with the dtype and a data pointer that is 256-byte aligned
  plus the view's byte offset, as a fresh torch allocation would be.

The recording follows the launches wherever the kernels and launchers live: nothing here names a
kernel. ``SPHINX_KERNELS_BACKEND=triton`` is set while recording, so ops that a compiled CUDA kernel
would serve on a real GPU still launch their Triton kernel (the fallback users without the extension
run). Triton must not be in interpreter mode (``TRITON_INTERPRET``): the kernels must be
``JITFunction`` objects.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any
from unittest import mock

import torch
from torch._library import custom_ops
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

if TYPE_CHECKING:
    from sphinx_kernels.aot.workloads import Workload

NAMESPACE = "sphinx_kernels"
_ALLOCATION_ALIGNMENT = 256  # torch's CUDA caching allocator hands out blocks at least this aligned


@dataclass(frozen=True)
class Target:
    """A GPU to compile for: its compute capability and the limits a launch must respect."""

    name: str                    # "sm_90"
    gpu: str                     # the device the properties below describe
    capability: tuple[int, int]
    multiprocessors: int
    shared_per_block: int        # bytes of shared memory one block may opt in to

    @property
    def arch(self) -> int:
        return self.capability[0] * 10 + self.capability[1]


TARGETS = (Target("sm_90", "H100 SXM", (9, 0), 132, 232448),
           Target("sm_80", "A100", (8, 0), 108, 166912))


@dataclass
class Launch:
    """One kernel launch as Triton's launcher specialises it for one target.

    ``constexprs`` and ``attrs`` are keyed by argument path (a tuple of indices, nested for tuple
    arguments), as ``triton.compiler.ASTSource`` takes them; ``options`` are the backend options
    (``num_warps``, ``num_stages``, ...) that ``triton.compile`` takes; ``grid`` the launch grid.
    """

    module: str
    qualname: str
    signature: dict[str, Any]
    constexprs: dict[tuple, Any]
    attrs: dict[tuple, list]
    options: dict[str, Any]
    grid: tuple[int, ...]
    cases: list[str] = field(default_factory=list)   # the workloads that launched it
    dtypes: list[str] = field(default_factory=list)  # and their data dtypes

    @property
    def name(self) -> str:
        """``<op>.<kernel>``: the kernel's function name after its module's in
        ``sphinx_kernels.triton`` (``patch_projection._grad_weight_kernel``)."""
        return f"{self.module.rsplit('.', 1)[-1]}.{self.qualname}"

    @property
    def key(self) -> str:
        """Identifies the compiled binary: equal keys compile to the same code."""
        return repr((self.module, self.qualname, sorted(self.signature.items()),
                     sorted(self.constexprs.items()), sorted(self.attrs.items()),
                     sorted(self.options.items())))

    def kernel(self):
        """The ``JITFunction`` itself (importing its module)."""
        target = importlib.import_module(self.module)
        for part in self.qualname.split("."):
            target = getattr(target, part)
        return target

    def constant(self, name: str) -> Any:
        """The value of constexpr parameter ``name``."""
        index = list(self.signature).index(name)
        return self.constexprs[(index,)]


class _Pointer:
    """What the binder sees of a tensor: its dtype and an address with the view's alignment."""

    def __init__(self, tensor: torch.Tensor):
        self.dtype = tensor.dtype
        offset = tensor.storage_offset() * tensor.element_size()
        self._address = _ALLOCATION_ALIGNMENT * 4096 + offset

    def data_ptr(self) -> int:
        return self._address


def _stand_in(value):
    if isinstance(value, torch.Tensor):
        return _Pointer(value)
    if isinstance(value, tuple):
        return tuple(_stand_in(v) for v in value)
    return value


class _Recorder:
    """Replaces ``JITFunction.run``: specialises each launch for ``target`` and keeps it."""

    def __init__(self, target: Target):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        self.target = target
        self.backend = make_backend(GPUTarget("cuda", target.arch, 32))
        self.launches: list[Launch] = []
        self.workload = None

    def run(self, fn, *args, grid, warmup, **kwargs):
        from triton import knobs
        from triton.runtime.jit import create_function_from_signature
        # As JITFunction.run: these two options join every launch's keyword arguments.
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        args = [_stand_in(a) for a in args]
        kwargs = {k: _stand_in(v) for k, v in kwargs.items()}
        binder = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound,
                                                              specialization, options)
        if callable(grid):
            grid = grid(bound)
        self.launches.append(Launch(fn.module, fn.fn.__qualname__, signature, constexprs, attrs,
                                    dict(options.__dict__), tuple(int(g) for g in grid),
                                    [self.workload.name], [self.workload.dtype]))


class _Autograd:
    """What a custom op's ``setup_context`` and ``backward`` use of an autograd context."""

    def __init__(self, inputs):
        self.needs_input_grad = tuple(_requires_grad(x) for x in inputs)
        self.saved_tensors = ()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors):
        pass

    def set_materialize_grads(self, value):
        pass


def _requires_grad(value) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_requires_grad(v) for v in value)
    return isinstance(value, torch.Tensor) and value.requires_grad


class _RunImplementations(TorchDispatchMode):
    """Runs this package's custom ops by their Python implementations (not their fake ones), and
    their registered backward right after the forward when an input requires grad."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        definition = custom_ops.OPDEFS.get(func._schema.name)
        if func.namespace != NAMESPACE or definition is None:
            return func(*args, **kwargs)
        with self:  # ops called by the implementation (a backward's ops) are run the same way
            out = definition._init_fn(*args, **kwargs)
            if definition._backward_fn is not None and _requires_grad(list(args)):
                ctx = _Autograd(args)
                definition._setup_context_fn(ctx, args, out)
                outs = out if isinstance(out, (tuple, list)) else (out,)
                grads = [torch.empty_like(o) if o.is_floating_point() else None for o in outs]
                definition._backward_fn(ctx, *grads)
        return out


@contextlib.contextmanager
def fake_gpu(target: Target) -> Iterator[_Recorder]:
    """Inside: fake CUDA tensors, the ops on their Triton backend's GPU branch, launches recorded
    into the yielded recorder (set its ``workload`` to label them)."""
    from triton.runtime.jit import JITFunction

    from sphinx_kernels import backends, platforms
    if platforms.triton_interpreted():
        raise RuntimeError("recording launches needs compiled Triton kernels: unset "
                           "TRITON_INTERPRET before sphinx_kernels is imported")
    recorder = _Recorder(target)
    properties = SimpleNamespace(name=f"{target.gpu} (recorded)", major=target.capability[0],
                                 minor=target.capability[1],
                                 multi_processor_count=target.multiprocessors,
                                 shared_memory_per_block_optin=target.shared_per_block,
                                 warp_size=32)

    def run(fn, *args, **kwargs):
        return recorder.run(fn, *args, **kwargs)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, {backends.ENV_BACKEND: "triton"}))
        stack.enter_context(mock.patch.object(torch.cuda, "get_device_capability",
                                              lambda device=None: target.capability))
        stack.enter_context(mock.patch.object(torch.cuda, "get_device_properties",
                                              lambda device=None: properties))
        stack.enter_context(mock.patch.dict(platforms._CAPABILITIES, clear=True))
        stack.enter_context(mock.patch.object(JITFunction, "run", run))
        stack.enter_context(FakeTensorMode())
        stack.enter_context(_RunImplementations())
        yield recorder


def record(workloads: Sequence[Workload], target: Target) -> list[Launch]:
    """Every launch the workloads make for ``target``, identical specialisations merged (their
    ``cases`` and ``dtypes`` list every workload that launched them, ``grid`` the largest on each
    axis), in first-launch order."""
    merged: dict[str, Launch] = {}
    with fake_gpu(target) as recorder:
        for workload in workloads:
            recorder.workload = workload
            workload.run()
    for launch in recorder.launches:
        known = merged.setdefault(launch.key, launch)
        if known is not launch:
            known.cases.extend(c for c in launch.cases if c not in known.cases)
            known.dtypes.extend(d for d in launch.dtypes if d not in known.dtypes)
            known.grid = tuple(map(max, known.grid, launch.grid))
    return list(merged.values())
