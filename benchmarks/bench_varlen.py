"""Benchmarks of kernel family 1 (packed sequences), in GB/s next to the measured copy bandwidth.

    python -m benchmarks --family varlen [--quick]

gather_rows against index_select on one table and the reference: on the CPU 10^5 rows x 257 float32
from three sources; on a GPU 10^6 rows x 4096 in fp32, fp16 and bf16.
find_padding_tiles against the reference: a batch of images of 3x3 tiles of 448 px (fewer on the CPU).
"""
from __future__ import annotations

import torch

from benchmarks.harness import Row, backends_to_time, bandwidth_row, run_family, time_ms
from sphinx_kernels.backends import Request
from sphinx_kernels.varlen import (FIND_PADDING_TILES_BACKENDS, GATHER_ROWS_BACKENDS,
                                   find_padding_tiles, gather_rows)

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


def bench_find_padding_tiles(device: torch.device, quick: bool,
                             ceiling_gbps: float | None) -> list[Row]:
    num = (4 if quick else 16) if device.type == "cuda" else 2
    tile, dtype = 448, torch.bfloat16 if device.type == "cuda" else torch.float32
    sets = []
    for seed in range(INPUT_SETS):
        images = torch.randn(num, 3, 3 * tile, 3 * tile, generator=torch.Generator().manual_seed(seed))
        images[:, :, tile:] = 0.0  # the lower two rows of tiles are padding: those are read whole
        sets.append(images.to(dtype).to(device))
    moved = sets[0].numel() * sets[0].element_size()
    shape = f"N={num} 3x{3 * tile}x{3 * tile} tile={tile}"
    return [bandwidth_row("find_padding_tiles", shape, str(dtype).removeprefix("torch."), backend,
                          time_ms(lambda x, b=backend: find_padding_tiles(x, tile, 0.0, backend=b),
                                  sets, device), moved, ceiling_gbps)
            for backend in backends_to_time(FIND_PADDING_TILES_BACKENDS, Request(device, dtype))]


def bench_family(device: torch.device, quick: bool, ceiling_gbps: float | None) -> list[Row]:
    return (bench_gather_rows(device, quick, ceiling_gbps)
            + bench_find_padding_tiles(device, quick, ceiling_gbps))


def run(device: torch.device, quick: bool) -> list[Row]:
    return run_family("varlen", device, quick, bench_family, ("cuda", "cpp"),
                      ("reference", "torch.index_select", "triton"))
