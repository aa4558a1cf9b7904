"""The one harness every benchmark uses: timing, the device's ceilings, results files and plots (the
rows themselves: ``benchmarks/rows.py``).

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
from dataclasses import asdict
from typing import Callable, Sequence

import torch

from benchmarks.peers import peer_status
from benchmarks.plots import plot_family
from benchmarks.rows import Row, bandwidth_row, fill_fractions, print_rows, print_speedups
from sphinx_kernels.backends import OpBackends
from sphinx_kernels.dtypes import dtype_name

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


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


def bandwidth_rows(op: str, table: OpBackends, call: Callable[[object, str], object],
                   inputs: Sequence[object], device: torch.device, dtype: torch.dtype, shape: str,
                   moved_bytes: int, ceiling_gbps: float | None,
                   request_dtype: torch.dtype | None = None, **features) -> list[Row]:
    """A GB/s row of ``call(inputs[i], backend)`` for each backend of ``table`` to time here
    (:func:`backends_to_time`, asked with ``request_dtype`` (default ``dtype``) and ``features``),
    labelled with ``dtype``, for a memory-bound op that must move ``moved_bytes``."""
    backends = backends_to_time(table, device, request_dtype or dtype, **features)
    return [bandwidth_row(op, shape, dtype_name(dtype), backend,
                          time_ms(lambda a, b=backend: call(a, b), inputs, device), moved_bytes,
                          ceiling_gbps) for backend in backends]


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


def run_family(family: str, device: torch.device, quick: bool,
               benches: Sequence[Callable[[torch.device, bool, float | None], list[Row]]],
               subjects: Sequence[str], baselines: Sequence[str],
               results_dir: str = RESULTS_DIR) -> list[Row]:
    """One family's benchmark run: measures the ceilings, runs each ``bench_<op>(device, quick,
    copy_gbps)`` of ``benches``, prints the rows and the speedups of ``subjects`` over
    ``baselines``, writes the results and the plot."""
    ceilings = measure_ceilings(device, quick)
    peers = peer_status(device)
    rows = [row for bench in benches for row in bench(device, quick, ceilings["copy_gbps"])]
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
