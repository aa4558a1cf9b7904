"""The one harness every benchmark uses: timing, the device's ceilings, result rows and plots.

Timing: warm-up calls, then the median of many timed calls (CUDA events on a GPU, perf_counter on
the CPU), each call on the next of several input sets so caches do not flatter. Ceilings are
measured in the same run: a large device-to-device copy (GB/s, bytes read plus written) and a large
matmul (TFLOP/s, bf16 on a GPU, fp32 on the CPU); on a device with published figures a ceiling more
than 20% off them flags the run as suspect. Results are JSON rows (op, shape, dtype, backend, ms,
GB/s or TFLOP/s, fraction of the ceiling) with the environment (device, torch / triton / CUDA
versions, git commit, date), the ceilings and the peers' availability, written to
``benchmarks/results/<family>-<device>.json`` beside a PNG plot of the same rows (when matplotlib is
installed). FLOP and byte counts live in ``benchmarks/counts.py``; the peers in
``benchmarks/peers.py``.
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

from benchmarks.peers import peer_status
from benchmarks.plots import plot_family
from sphinx_kernels.backends import OpBackends

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
    size: float | None = None  # the x axis of the family's plot (tokens, rows, views) if it sweeps
    extra: dict = field(default_factory=dict)


def bandwidth_row(op: str, shape: str, dtype: str, backend: str, ms: float, moved_bytes: int,
                  ceiling_gbps: float | None) -> Row:
    """A row for a memory-bound op: GB/s from the bytes it must move, and the fraction of the
    ceiling."""
    gbps = moved_bytes / ms / 1e6
    return Row(op, shape, dtype, backend, ms, gbps=gbps,
               fraction_of_ceiling=gbps / ceiling_gbps if ceiling_gbps else None)


def compute_row(op: str, shape: str, dtype: str, backend: str, ms: float, flops: int,
                ceiling_tflops: float | None = None, size: float | None = None, **extra) -> Row:
    """A row for a compute-bound op: TFLOP/s from its useful FLOPs (``benchmarks.counts``), and the
    fraction of ``ceiling_tflops`` (e.g. the bare cuBLAS GEMM of the same shape); without one,
    :func:`run_family` fills the fraction from the measured matmul ceiling. ``extra``: more columns
    (peak memory, ...)."""
    tflops = flops / ms / 1e9
    return Row(op, shape, dtype, backend, ms, tflops=tflops, size=size,
               fraction_of_ceiling=tflops / ceiling_tflops if ceiling_tflops else None, extra=extra)


def peak_memory_mb(fn: Callable[[object], object], args: object,
                   device: torch.device) -> float | None:
    """MiB allocated by one call of ``fn(args)`` above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn(args)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def backends_to_time(op: OpBackends, device: torch.device, dtype: torch.dtype,
                     **features) -> list[str]:
    """The names of ``op``'s backends that serve a call on ``device`` in ``dtype`` with ``features``
    (its request type's fields) here, less Triton on the CPU: the interpreter is a correctness tool,
    not a CPU backend to time."""
    return [name for name in op.available(op.request(device, dtype, **features))
            if not (name == "triton" and device.type == "cpu")]


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


def matmul_tflops(device: torch.device, quick: bool = False) -> tuple[float, str]:
    """The device's measured matmul ceiling: TFLOP/s of a large square product on random data, and
    what was multiplied (bf16 8192^3 on a GPU; fp32 on the CPU, where it only gives the scale)."""
    if device.type == "cuda":
        size, dtype = (4096 if quick else 8192), torch.bfloat16
    else:
        size, dtype = (512 if quick else 1024), torch.float32
    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(size, size, generator=gen).to(device, dtype),
              torch.randn(size, size, generator=gen).to(device, dtype)) for _ in range(2)]
    out = torch.empty(size, size, device=device, dtype=dtype)
    ms = time_ms(lambda ab: torch.mm(*ab, out=out), pairs, device, warmup=3, repeats=10)
    return 2 * size**3 / ms / 1e9, f"{str(dtype).removeprefix('torch.')} {size}x{size}x{size}"


# Figures measured on the lent machines (see the device tool's notes) and the task's own: a ceiling
# measured more than 20% away from them means the run itself is off (clocks, a busy GPU, a bad
# driver).
KNOWN_CEILINGS = {
    "NVIDIA H100 80GB HBM3": {"copy_gbps": 3000.0, "matmul_tflops": 790.0},
    "NVIDIA H200": {"copy_gbps": 4300.0, "matmul_tflops": 790.0},
}
SUSPECT_TOLERANCE = 0.2


def suspect_ceilings(name: str, ceilings: dict) -> list[str]:
    """Why the measured ``ceilings`` of device ``name`` look wrong; empty when they look right or
    the device has no known figures."""
    known = KNOWN_CEILINGS.get(name, {})
    return [f"{key} measured {ceilings[key]:.0f}, expected about {value:.0f}"
            for key, value in known.items()
            if key in ceilings and abs(ceilings[key] / value - 1) > SUSPECT_TOLERANCE]


def measure_ceilings(device: torch.device, quick: bool) -> dict:
    """Copy GB/s and matmul TFLOP/s of this device, measured now, with any reason to distrust
    them."""
    tflops, matmul = matmul_tflops(device, quick)
    ceilings = {"copy_gbps": copy_bandwidth_gbps(device, 256 if quick else 1024),
                "matmul_tflops": tflops, "matmul": matmul}
    ceilings["suspect"] = suspect_ceilings(device_name(device), ceilings)
    return ceilings


def fill_fractions(rows: Sequence[Row], ceilings: dict) -> None:
    """Fraction of the ceiling for rows that have a throughput but no fraction yet."""
    for r in rows:
        if r.fraction_of_ceiling is not None:
            continue
        if r.tflops is not None and ceilings.get("matmul_tflops"):
            r.fraction_of_ceiling = r.tflops / ceilings["matmul_tflops"]
        elif r.gbps is not None and ceilings.get("copy_gbps"):
            r.fraction_of_ceiling = r.gbps / ceilings["copy_gbps"]


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


def results_path(family: str, device: torch.device, quick: bool, suffix: str = ".json",
                 results_dir: str = RESULTS_DIR) -> str:
    """``<results_dir>/<family>-<device>[-quick]<suffix>``: quick runs never replace published
    results."""
    slug = "".join(c if c.isalnum() else "-" for c in device_name(device).lower()).strip("-")
    return os.path.join(results_dir, f"{family}-{slug}{'-quick' if quick else ''}{suffix}")


def write_results(family: str, device: torch.device, rows: Sequence[Row], ceilings: dict,
                  quick: bool, peers: dict | None = None, results_dir: str = RESULTS_DIR) -> str:
    """Writes the rows with the environment, ceilings and peers; returns the path. Quick runs go to
    a ``-quick`` file (git-ignored), so a first look never replaces published results."""
    os.makedirs(results_dir, exist_ok=True)
    path = results_path(family, device, quick, results_dir=results_dir)
    payload = {"family": family, "quick": quick, "environment": environment(device),
               "ceilings": ceilings, "peers": peers or {}, "rows": [asdict(r) for r in rows]}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
    return path


def format_throughput(r: Row) -> str:
    if r.tflops is not None:
        return f"{r.tflops:.3g} TFLOP/s"
    if r.gbps is not None:
        return f"{r.gbps:.3g} GB/s"
    return ""


def format_extra(r: Row) -> str:
    return "".join(f" {k}={v:.0f}" if isinstance(v, float) else f" {k}={v}"
                   for k, v in r.extra.items() if v is not None)


def print_rows(rows: Sequence[Row]) -> None:
    print(f"{'op':<20} {'shape':<30} {'dtype':<9} {'backend':<20} {'ms':>9} {'throughput':>15} "
          f"{'of ceiling':>10}")
    for r in rows:
        frac = f"{r.fraction_of_ceiling:10.0%}" if r.fraction_of_ceiling is not None else ""
        print(f"{r.op:<20} {r.shape:<30} {r.dtype:<9} {r.backend:<20} {r.ms:9.3f} "
              f"{format_throughput(r):>15} {frac}{format_extra(r)}")


def run_family(family: str, device: torch.device, quick: bool,
               bench: Callable[[torch.device, bool, float], list[Row]], subjects: Sequence[str],
               baselines: Sequence[str], results_dir: str = RESULTS_DIR) -> list[Row]:
    """One family's benchmark run: measures the ceilings, runs ``bench(device, quick, copy_gbps)``,
    prints the rows and the speedups of ``subjects`` over ``baselines``, writes the results and the
    plot."""
    ceilings = measure_ceilings(device, quick)
    peers = peer_status(device)
    rows = bench(device, quick, ceilings["copy_gbps"])
    fill_fractions(rows, ceilings)
    print(f"device: {device_name(device)}: measured copy {ceilings['copy_gbps']:.1f} GB/s, matmul "
          f"{ceilings['matmul_tflops']:.2f} TFLOP/s ({ceilings['matmul']})")
    for why in ceilings["suspect"]:
        print(f"SUSPECT RUN: {why}")
    skipped = {name: why for name, why in peers.items() if why != "available"}
    if skipped:
        print("peers skipped here: " + "; ".join(f"{n} ({w})" for n, w in skipped.items()))
    print_rows(rows)
    print_speedups(rows, subjects, baselines)
    path = write_results(family, device, rows, ceilings, quick, peers, results_dir)
    print(f"results: {path}")
    plot = plot_family(family, rows, results_path(family, device, quick, ".png", results_dir),
                       title=f"{family} on {device_name(device)}")
    print(f"plot: {plot}" if plot.endswith(".png") else plot)
    return rows


def print_speedups(rows: Sequence[Row], subjects: Sequence[str], baselines: Sequence[str]) -> None:
    """For each (op, shape, dtype): how many times faster each subject backend is than each
    baseline."""
    by_case: dict[tuple, dict[str, float]] = {}
    for r in rows:
        by_case.setdefault((r.op, r.shape, r.dtype), {})[r.backend] = r.ms
    for (op, shape, dtype), times in by_case.items():
        for subject in (s for s in subjects if s in times):
            ratios = ", ".join(f"{times[b] / times[subject]:.2f}x {b}" for b in baselines
                               if b in times and b != subject)
            if ratios:
                print(f"{op} {shape} {dtype}: {subject} is {ratios}")
