"""The one harness every benchmark uses: timing, the device's copy ceiling, and result rows.

Timing: warm-up calls, then the median of many timed calls (CUDA events on a GPU, perf_counter on the
CPU), each call on the next of several input sets so caches do not flatter. Results are JSON rows
(op, shape, dtype, backend, ms, GB/s or TFLOP/s, fraction of the ceiling, device, versions, commit,
date) written to ``benchmarks/results/<family>-<device>.json``.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from sphinx_kernels.backends import OpBackends, Request

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    backend: str
    ms: float
    gbps: float | None = None
    tflops: float | None = None
    fraction_of_ceiling: float | None = None
    extra: dict = field(default_factory=dict)


def bandwidth_row(op: str, shape: str, dtype: str, backend: str, ms: float, moved_bytes: int,
                  ceiling_gbps: float | None) -> Row:
    """A row for a memory-bound op: GB/s from the bytes it must move, and the fraction of the ceiling."""
    gbps = moved_bytes / ms / 1e6
    return Row(op, shape, dtype, backend, ms, gbps=gbps,
               fraction_of_ceiling=gbps / ceiling_gbps if ceiling_gbps else None)


def compute_row(op: str, shape: str, dtype: str, backend: str, ms: float, flops: int,
                ceiling_tflops: float | None, **extra) -> Row:
    """A row for a compute-bound op: TFLOP/s from the flops it must do, and the fraction of the
    ceiling (e.g. the bare cuBLAS GEMM of the same shape)."""
    tflops = flops / ms / 1e9
    return Row(op, shape, dtype, backend, ms, tflops=tflops,
               fraction_of_ceiling=tflops / ceiling_tflops if ceiling_tflops else None, extra=extra)


def peak_memory_mb(fn: Callable[[object], object], args: object, device: torch.device) -> float | None:
    """MiB allocated by one call of ``fn(args)`` above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn(args)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def backends_to_time(op: OpBackends, request: Request) -> list[str]:
    """The names of ``op``'s backends that serve ``request`` here, less Triton on the CPU: the
    interpreter is a correctness tool, not a CPU backend to time."""
    return [b.name for b in op.backends if not b.not_supported_reasons(request)
            and not (b.name == "triton" and request.device.type == "cpu")]


def time_ms(fn: Callable[[object], object], inputs: Sequence[object], device: torch.device, *,
            warmup: int = 3, repeats: int = 20) -> float:
    """Median milliseconds of ``fn(inputs[i % len(inputs)])`` over ``repeats`` calls."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    samples = []
    for i in range(repeats):
        args = inputs[i % len(inputs)]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(args)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn(args)
            samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples)


def copy_bandwidth_gbps(device: torch.device, megabytes: int = 1024) -> float:
    """The device's measured copy ceiling: GB/s (read + write) of one large tensor copy."""
    numel = megabytes * 2**20 // 4
    sources = [torch.empty(numel, device=device) for _ in range(2)]
    dest = torch.empty_like(sources[0])
    ms = time_ms(lambda src: dest.copy_(src), sources, device, warmup=2, repeats=10)
    return 2 * numel * 4 / ms / 1e6


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(RESULTS_DIR)).stdout.strip()
    except OSError:
        commit = ""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "commit": commit or "unknown",
            "date": datetime.date.today().isoformat()}


def write_results(family: str, device: torch.device, rows: Sequence[Row], ceilings: dict,
                  quick: bool) -> str:
    """Writes the rows with the environment and ceilings; returns the path. Quick runs go to a
    ``-quick`` file (git-ignored), so a first look never replaces published results."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in device_name(device).lower()).strip("-")
    path = os.path.join(RESULTS_DIR, f"{family}-{slug}{'-quick' if quick else ''}.json")
    payload = {"environment": environment(device), "ceilings": ceilings,
               "rows": [asdict(r) for r in rows]}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
    return path


def print_rows(rows: Sequence[Row]) -> None:
    """One line per row: GB/s for memory-bound rows, TFLOP/s for compute-bound ones, then extras."""
    print(f"{'op':<18} {'shape':<28} {'dtype':<9} {'backend':<18} {'ms':>9} {'GB/s|TF/s':>9} "
          f"{'of ceiling':>10}")
    for r in rows:
        rate = r.gbps if r.gbps is not None else r.tflops
        rate = f"{rate:9.1f}" if rate is not None else " " * 9
        frac = f"{r.fraction_of_ceiling:10.0%}" if r.fraction_of_ceiling is not None else " " * 10
        extra = "".join(f" {k}={v:.0f}" if isinstance(v, float) else f" {k}={v}"
                        for k, v in r.extra.items() if v is not None)
        print(f"{r.op:<18} {r.shape:<28} {r.dtype:<9} {r.backend:<18} {r.ms:9.3f} {rate} {frac}"
              f"{extra}")


def run_family(family: str, device: torch.device, quick: bool,
               bench: Callable[[torch.device, bool, float], list[Row]], subjects: Sequence[str],
               baselines: Sequence[str]) -> list[Row]:
    """One family's benchmark run: measures the copy ceiling, runs ``bench(device, quick, ceiling)``,
    prints the rows and the speedups of ``subjects`` over ``baselines``, and writes the results."""
    ceiling = copy_bandwidth_gbps(device, 256 if quick else 1024)
    rows = bench(device, quick, ceiling)
    print(f"device: {device}, measured copy bandwidth {ceiling:.1f} GB/s")
    print_rows(rows)
    print_speedups(rows, subjects, baselines)
    path = write_results(family, device, rows, {"copy_gbps": ceiling}, quick)
    print(f"results: {path}")
    return rows


def print_speedups(rows: Sequence[Row], subjects: Sequence[str], baselines: Sequence[str]) -> None:
    """For each (op, shape, dtype): how many times faster each subject backend is than each baseline."""
    by_case: dict[tuple, dict[str, float]] = {}
    for r in rows:
        by_case.setdefault((r.op, r.shape, r.dtype), {})[r.backend] = r.ms
    for (op, shape, dtype), times in by_case.items():
        for subject in (s for s in subjects if s in times):
            ratios = ", ".join(f"{times[b] / times[subject]:.2f}x {b}" for b in baselines if b in times)
            print(f"{op} {shape} {dtype}: {subject} is {ratios}")
