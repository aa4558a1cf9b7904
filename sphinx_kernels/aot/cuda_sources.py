"""Registers and spills of the CUDA sources (``csrc/**/*.cu``), from nvcc's ptxas.

Each file is compiled alone, for every architecture in one nvcc run, with the flags ``setup.py``
gives nvcc (``-O3 -lineinfo -std=c++17``) plus ``-Xptxas -v``; every kernel instantiation's
registers, spill stores and loads, and static shared memory are read from the log. The sources
include only CUDA headers, so a file takes seconds. The toolkit is the ``nvcc`` on the PATH (or in
``CUDA_HOME``).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass

NVCC_FLAGS = ("-O3", "-lineinfo", "-std=c++17")
ARCHS = {"sm_90": "90", "sm_80": "80"}

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


@dataclass
class CudaKernel:
    """One kernel instantiation of a ``.cu`` file, compiled for one architecture."""

    source: str        # path relative to the repository
    name: str          # demangled, no namespaces or parameters: "gather_rows_kernel<uint4, int>"
    target: str        # "sm_90"
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int        # static shared memory, bytes

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    def to_dict(self) -> dict:
        return asdict(self)


def nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def sources(root: str) -> list[str]:
    """The ``.cu`` files under ``root/csrc``, relative to ``root``, sorted."""
    found = []
    for folder, _, files in os.walk(os.path.join(root, "csrc")):
        found += [os.path.relpath(os.path.join(folder, f), root)
                  for f in files if f.endswith(".cu")]
    return sorted(found)


def compile_source(root: str, source: str) -> list[CudaKernel]:
    """Compiles ``source`` for every architecture of ``ARCHS`` and reads every kernel's resources.
    Raises ``RuntimeError`` with nvcc's log when it does not compile."""
    gencodes = [flag for arch in ARCHS.values()
                for flag in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    with tempfile.TemporaryDirectory() as scratch:
        command = [nvcc(), *NVCC_FLAGS, "-Xptxas", "-v", *gencodes, "-c",
                   os.path.join(root, source), "-o", os.path.join(scratch, "kernels.o")]
        done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source}:\n{done.stderr[-4000:]}")
    return parse_log(done.stdout + done.stderr, source)


def parse_log(log: str, source: str) -> list[CudaKernel]:
    """The kernels of a ``-Xptxas -v`` log, in its order."""
    kernels: list[CudaKernel] = []
    current = None
    for line in log.splitlines():
        if entry := _ENTRY.search(line):
            current = {"mangled": entry.group(1), "target": entry.group(2), "frame": (0, 0, 0)}
        elif current and (frame := _FRAME.search(line)):
            current["frame"] = tuple(int(g) for g in frame.groups())
        elif current and (used := _USED.search(line)):
            _, stores, loads = current["frame"]
            kernels.append(CudaKernel(source, current["mangled"], current["target"],
                                      int(used.group(1)), stores, loads, int(used.group(2) or 0)))
            current = None
    names = demangle([k.name for k in kernels])
    for kernel, name in zip(kernels, names):
        kernel.name = name
    return kernels


def demangle(symbols: list[str]) -> list[str]:
    """Short readable names: c++filt's, without namespaces and parameter lists (symbols as they are
    when c++filt is missing)."""
    if not symbols or shutil.which("c++filt") is None:
        return symbols
    done = subprocess.run(["c++filt"], input="\n".join(symbols), check=False,
                          capture_output=True, text=True)
    names = done.stdout.splitlines()
    if done.returncode != 0 or len(names) != len(symbols):
        return symbols
    return [_short(name) for name in names]


def _short(name: str) -> str:
    """``void ns::(anonymous namespace)::kernel<int>(args)`` -> ``kernel<int>``."""
    name = name.removeprefix("void ")
    depth, end = 0, len(name)
    for i, char in enumerate(name):  # the parameter list: the first "(" outside template brackets
        depth += (char == "<") - (char == ">")
        if char == "(" and depth == 0 and not name.startswith("(anonymous", i):
            end = i
            break
    name = name[:end]
    name = name.replace("(anonymous namespace)::", "")
    depth, cut = 0, 0
    for i, char in enumerate(name):  # drop the namespaces: the last "::" outside template brackets
        depth += (char == "<") - (char == ">")
        if name.startswith("::", i) and depth == 0:
            cut = i + 2
    return name[cut:].replace("sphinx_kernels::", "")
