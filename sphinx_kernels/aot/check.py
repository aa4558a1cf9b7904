"""The whole check: record every launch for each target, compile each distinct specialisation (and
each CUDA source) in parallel worker processes, judge them by the policy.

Workers are spawned (not forked: the parent holds torch and fake-mode state); each compiles one
specialisation at a time, so the load balances whatever the kernels cost. Their Triton cache is a
temporary directory: every compile is done afresh anyway (see ``compile``), and a run would
otherwise leave some 200 MB of kernels in the user's cache.
"""
from __future__ import annotations

import multiprocessing
import os
import platform
import re
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from sphinx_kernels.aot import cuda_sources, policy
from sphinx_kernels.aot.compile import Measurement, compile_launch
from sphinx_kernels.aot.record import TARGETS, Launch, Target, record
from sphinx_kernels.aot.workloads import workloads

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Row:
    """One specialisation on one target."""

    launch: Launch
    target: Target
    measurement: Measurement
    violations: list[policy.Violation]

    @property
    def failed(self) -> list[policy.Violation]:
        """The violations no exemption covers."""
        return [v for v in self.violations if v.excused_by is None]


@dataclass
class Results:
    rows: list[Row]
    cuda: list[cuda_sources.CudaKernel]
    cuda_errors: list[str]
    environment: dict
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def failures(self) -> list[tuple[Row, policy.Violation]]:
        return [(row, v) for row in self.rows for v in row.failed]

    @property
    def cuda_spills(self) -> list[cuda_sources.CudaKernel]:
        return [k for k in self.cuda if k.spills]

    @property
    def ok(self) -> bool:
        return not self.failures and not self.cuda_spills and not self.cuda_errors


def _use_cache(path: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = path


def _expected_cost(job: tuple[Launch, Target]) -> tuple:
    """Longest first, so that no long compile starts last: float32 data (the largest tiles, the
    slowest register allocation), then the kernels with the most dots."""
    launch, _ = job
    return "float32" in launch.dtypes, launch.kernel().src.count("tl.dot(")


def _compile_cuda(source: str):
    try:
        return cuda_sources.compile_source(ROOT, source), None
    except (RuntimeError, OSError) as error:
        return [], str(error)


def environment() -> dict:
    import torch
    import triton
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(90)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=False,
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"torch": torch.__version__, "triton": triton.__version__,
            "ptxas": ptxas.version.strip().splitlines()[-1] if ptxas.version else "",
            "nvcc": _nvcc_version(), "machine": platform.machine(), "commit": commit}


def _nvcc_version() -> str:
    tool = cuda_sources.nvcc()
    if tool is None:
        return ""
    done = subprocess.run([tool, "--version"], check=False, capture_output=True, text=True)
    release = re.search(r"release ([\d.]+), (V[\d.]+)", done.stdout)
    return f"{release.group(1)} ({release.group(2)})" if release else ""


def in_turn(compile_one, jobs: list[tuple[Launch, Target]], cache: str) -> dict:
    """``compile_one(launch, target)`` for each job, one at a time in a worker process that is
    replaced when a compile kills it (LLVM aborts the process on some invalid kernels): the dead
    one's measurement is a compile error, the others go on. Keyed as ``run`` keys its futures."""
    results = {}
    context = multiprocessing.get_context("spawn")
    pool = None
    for launch, target in jobs:
        pool = pool or ProcessPoolExecutor(max_workers=1, mp_context=context,
                                           initializer=_use_cache, initargs=(cache,))
        try:
            results[launch.key, target.name] = pool.submit(compile_one, launch, target).result()
        except BrokenProcessPool:
            results[launch.key, target.name] = Measurement(target.name, error=(
                "the compiler process died (an LLVM abort: its message is on stderr)"))
            pool.shutdown()
            pool = None
    if pool is not None:
        pool.shutdown()
    return results


def run(jobs: int = 2, targets: tuple[Target, ...] = TARGETS, cuda: bool = True,
        only: str | None = None) -> Results:
    """Records, compiles and judges everything; ``jobs`` worker processes compile. ``only``: just
    the kernels whose name (``<op>.<kernel>``) contains it."""
    start = time.perf_counter()
    timings = {}
    sources = cuda_sources.sources(ROOT) if cuda and cuda_sources.nvcc() else []
    context = multiprocessing.get_context("spawn")
    with (tempfile.TemporaryDirectory(prefix="sphinx-aot-") as cache,
          ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_use_cache,
                              initargs=(cache,)) as pool):
        # The CUDA sources first: their nvcc runs start the workers while this process records.
        cuda_jobs = [pool.submit(_compile_cuda, source) for source in sources]
        launches = {target.name: [launch for launch in record(workloads(), target)
                                  if only is None or only in launch.name]
                    for target in targets}
        timings["record"] = time.perf_counter() - start
        ordered = [(launch, target) for target in targets for launch in launches[target.name]]
        futures = {(launch.key, target.name): pool.submit(compile_launch, launch, target)
                   for launch, target in sorted(ordered, key=_expected_cost, reverse=True)}
        measurements = {}
        for key, future in futures.items():
            try:
                measurements[key] = future.result()
            except BrokenProcessPool:  # a compile killed its worker, and the pool with it
                pass
        missed = [(launch, target) for launch, target in ordered
                  if (launch.key, target.name) not in measurements]
        measurements.update(in_turn(compile_launch, missed, cache))
        rows = []
        for launch, target in ordered:  # the table keeps the recording order
            measurement = measurements[launch.key, target.name]
            rows.append(Row(launch, target, measurement,
                            policy.violations(launch, measurement, target)))
        cuda_kernels, cuda_errors = [], []
        for source, job in zip(sources, cuda_jobs):
            kernels, error = job.result() if not job.exception() else _compile_cuda(source)
            cuda_kernels += kernels
            if error:
                cuda_errors.append(error)
    timings["compile"] = time.perf_counter() - start - timings["record"]
    timings["triton compile (sum over workers)"] = sum(r.measurement.seconds for r in rows)
    return Results(rows, cuda_kernels, cuda_errors, environment(),
                   time.perf_counter() - start, timings)
