"""Benchmarks of kernel family 1 (packed sequences): gather_rows against index_select and the reference.

    python -m benchmarks --family varlen [--quick]

On the CPU: 10^5 rows x 257 float32 from three sources. On a GPU: 10^6 rows x 4096 from three sources in
fp32, fp16 and bf16, in GB/s next to the measured copy bandwidth.
"""
from __future__ import annotations

import torch

from benchmarks.harness import Row, backends_to_time, bandwidth_row, run_family, time_ms
from sphinx_kernels.backends import Request
from sphinx_kernels.varlen import GATHER_ROWS_BACKENDS, gather_rows

INPUT_SETS = 3


def gather_inputs(num_rows, width, dtype, device, source_rows, seed):
    gen = torch.Generator().manual_seed(seed)
    sources = [torch.randn(n, width, generator=gen).to(dtype).to(device) for n in source_rows]
    source_ids = torch.randint(len(source_rows), (num_rows,), generator=gen, dtype=torch.int32)
    limit = torch.tensor(source_rows)[source_ids.long()]
    row_ids = (torch.rand(num_rows, generator=gen) * limit).int()
    return sources, source_ids.to(device), row_ids.to(device)


def bench_gather_rows(device: torch.device, quick: bool, ceiling_gbps: float | None) -> list[Row]:
    if device.type == "cuda":
        num_rows, width, dtypes = (10**5 if quick else 10**6), 4096, (torch.float32, torch.float16,
                                                                      torch.bfloat16)
    else:
        num_rows, width, dtypes = (10**4 if quick else 10**5), 257, (torch.float32,)
    source_rows = (32000, num_rows // 2, 3)  # embedding table, visual rows, special vectors
    rows = []
    for dtype in dtypes:
        sets = [gather_inputs(num_rows, width, dtype, device, source_rows, seed)
                for seed in range(INPUT_SETS)]
        moved = 2 * num_rows * width * sets[0][0][0].element_size()  # each row read once, written once
        shape = f"T={num_rows} D={width} S=3"
        dtype_name = str(dtype).removeprefix("torch.")
        for backend in backends_to_time(GATHER_ROWS_BACKENDS, Request(device, dtype)):
            ms = time_ms(lambda a, b=backend: gather_rows(*a, backend=b), sets, device)
            rows.append(bandwidth_row("gather_rows", shape, dtype_name, backend, ms, moved,
                                      ceiling_gbps))
        # The peer: one index_select from a single table of the same rows (no source choice to make).
        single = [(torch.cat(s[0]), s[2].long()) for s in sets]
        ms = time_ms(lambda a: a[0].index_select(0, a[1]), single, device)
        rows.append(bandwidth_row("gather_rows", shape, dtype_name, "torch.index_select", ms, moved,
                                  ceiling_gbps))
    return rows


def run(device: torch.device, quick: bool) -> list[Row]:
    return run_family("varlen", device, quick, bench_gather_rows, ("cuda", "cpp"),
                      ("reference", "torch.index_select", "triton"))
