"""Compiling a recorded launch for a target and reading what the GPU would need to run it.

``triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32),
options=...)`` is the compile Triton's launcher would do on that GPU, down to the cubin. From it:
shared memory per block (``metadata.shared``), and from ptxas's ``-v`` log (Triton runs ptxas with
``-v``; its log is printed while ``knobs.nvidia.dump_ptxas_log`` is on) the registers per thread,
spill stores and loads, and any warning or performance note. Every compile is done afresh
(``always_compile``): a kernel taken from Triton's cache would come without a ptxas log.

A specialisation whose shared memory (known once Triton has lowered it to LLVM IR) exceeds the
target's limit cannot launch whatever its registers: its compile stops there (``stopped``), which
spares the slowest compiles of all, those of oversized configurations.

Tensor cores: every ``tt.dot`` whose operands are 16-bit floats (the IR's ``bf16``/``f16``) is
classified from the TTGIR by how Triton lowered it: ``wgmma`` (``ttng.warp_group_dot``, Hopper's
warp-group MMA), ``mma`` (``tt.dot`` with an ``nvidia_mma`` v2 layout: ``mma.sync``), or ``fma``
(``tt.dot`` with a blocked layout: no tensor cores); the PTX is checked to hold the instructions.
"""
from __future__ import annotations

import contextlib
import io
import re
import time
from dataclasses import asdict, dataclass, field

from sphinx_kernels.aot.record import Launch, Target


@dataclass
class Measurement:
    """What one specialisation needs on one target (``error`` set when it does not compile)."""

    target: str
    shared: int = 0                  # bytes of shared memory per block
    registers: int = 0               # per thread
    spill_stores: int = 0            # bytes
    spill_loads: int = 0
    stack: int = 0                   # bytes of stack frame (spills and local arrays)
    dots: dict[str, int] = field(default_factory=dict)  # 16-bit dots by lowering: wgmma, mma, fma
    warnings: list[str] = field(default_factory=list)   # ptxas warnings and performance notes
    error: str | None = None
    stopped: str | None = None       # why the compile stopped before ptxas, when it did
    seconds: float = 0.0

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    def to_dict(self) -> dict:
        return asdict(self)


_REGISTERS = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_NOTE = re.compile(r"warning|Performance Loss", re.IGNORECASE)


def parse_ptxas_log(log: str) -> dict:
    """Registers, spills, stack frame and warnings of the single function in a ``ptxas -v`` log."""
    registers = _REGISTERS.search(log)
    frame = _FRAME.search(log)
    stack, stores, loads = (int(g) for g in frame.groups()) if frame else (0, 0, 0)
    notes = [line.strip().removeprefix("ptxas").strip(" :")
             for line in log.splitlines() if _NOTE.search(line)]
    return {"registers": int(registers.group(1)) if registers else 0, "spill_stores": stores,
            "spill_loads": loads, "stack": stack, "warnings": notes}


_LAYOUT = re.compile(r"^(#\w+) = #ttg\.(\w+)<\{(?:versionMajor = (\d+))?", re.MULTILINE)
_DOT = re.compile(r"= (ttng\.warp_group_dot|tt\.dot) .* : (.*)$", re.MULTILINE)
_OPERAND_16BIT = re.compile(r"x(bf16|f16)[,>]")
_RESULT_LAYOUT = re.compile(r"-> tensor<[^,]+, (#\w+)>")


def classify_dots(ttgir: str) -> dict[str, int]:
    """How many dots with 16-bit operands became ``wgmma``, ``mma`` and ``fma`` (see the module)."""
    layouts = {name: (kind, int(major or 0)) for name, kind, major in _LAYOUT.findall(ttgir)}
    counts: dict[str, int] = {}
    for op, types in _DOT.findall(ttgir):
        operands = types.split("->")[0]
        if not _OPERAND_16BIT.search(operands.split("*")[0]):
            continue
        if op == "ttng.warp_group_dot":
            kind = "wgmma"
        else:
            result = _RESULT_LAYOUT.search(types)
            layout = layouts.get(result.group(1), ("", 0)) if result else ("", 0)
            kind = "mma" if layout[0] == "nvidia_mma" and layout[1] == 2 else "fma"
        counts[kind] = counts.get(kind, 0) + 1
    return counts


_PTX_INSTRUCTION = {"wgmma": "wgmma.mma_async", "mma": "mma.sync"}


class _CannotLaunch(Exception):
    def __init__(self, shared: int, ttgir: str):
        super().__init__(shared)
        self.shared, self.ttgir = shared, ttgir


def _stop_over_shared(limit: int):
    """A Triton stages hook: the LLVM IR stage raises ``_CannotLaunch`` when the kernel needs more
    than ``limit`` bytes of shared memory (Triton calls the hook without arguments for the part of
    the cache key it adds)."""
    def hook(backend=None, stages=None, options=None, language=None, capability=None):
        if backend is None:
            return f"stop-over-shared-{limit}", ""
        lower = stages["llir"]

        def checked(ttgir, metadata):
            text = str(ttgir)
            llir = lower(ttgir, metadata)
            if metadata["shared"] > limit:
                raise _CannotLaunch(metadata["shared"], text)
            return llir
        stages["llir"] = checked
    return hook


def compile_launch(launch: Launch, target: Target) -> Measurement:
    """Compiles ``launch`` for ``target`` (in this process) and measures it."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    measurement = Measurement(target.name)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with (knobs.nvidia.scope(), knobs.compilation.scope(), knobs.runtime.scope(),
              contextlib.redirect_stdout(log)):
            knobs.nvidia.dump_ptxas_log = True
            knobs.compilation.always_compile = True
            knobs.runtime.add_stages_inspection_hook = _stop_over_shared(target.shared_per_block)
            source = ASTSource(launch.kernel(), launch.signature, launch.constexprs, launch.attrs)
            kernel = triton.compile(source, target=GPUTarget("cuda", target.arch, 32),
                                    options=launch.options)
    except _CannotLaunch as over:
        measurement.shared = over.shared
        measurement.dots = classify_dots(over.ttgir)
        measurement.stopped = "not compiled past LLVM IR: over the shared-memory limit"
    except Exception as error:  # noqa: BLE001  (any stage's error means "does not compile")
        measurement.error = f"{type(error).__name__}: {_first_lines(str(error))}"
    else:
        for name, value in parse_ptxas_log(log.getvalue()).items():
            setattr(measurement, name, value)
        measurement.shared = int(kernel.metadata.shared)
        measurement.dots = classify_dots(kernel.asm["ttgir"])
        for kind, instruction in _PTX_INSTRUCTION.items():
            if measurement.dots.get(kind) and instruction not in kernel.asm["ptx"]:
                measurement.warnings.append(f"TTGIR has {kind} dots but the PTX has no "
                                            f"{instruction}")
    measurement.seconds = time.perf_counter() - start
    return measurement


def _first_lines(text: str, lines: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[:lines])
