"""What a benchmark measures: one :class:`Row` per (op, shape, dtype, backend), its throughput (GB/s
for memory-bound ops, TFLOP/s for compute-bound ones) and the fraction of the device's ceiling;
printing rows and the speedups of subjects over baselines."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


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


def fill_fractions(rows: Sequence[Row], ceilings: dict) -> None:
    """Fraction of the ceiling for rows that have a throughput but no fraction yet."""
    for r in rows:
        if r.fraction_of_ceiling is not None:
            continue
        if r.tflops is not None and ceilings.get("matmul_tflops"):
            r.fraction_of_ceiling = r.tflops / ceilings["matmul_tflops"]
        elif r.gbps is not None and ceilings.get("copy_gbps"):
            r.fraction_of_ceiling = r.gbps / ceilings["copy_gbps"]


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
