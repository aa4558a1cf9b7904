"""Benchmarks of kernel family 2 (patch projection): the fused op against the unfused eager chain
(pooling, transposing and concatenating copies, Linear, LayerNorm, index_copy into the packed
sequence: ``patch_projection_reference``), ``torch.compile`` of that chain, and a bare cuBLAS GEMM
(``F.linear``) on a pre-concatenated input, forward and forward+backward, in TFLOP/s, as a fraction
of the bare GEMM's, with peak memory.

    python -m benchmarks --family projection [--quick]

On a GPU: SPHINX-X sizes in bfloat16: DINOv2 tokens ``[V, 1 + 16*16, 1536]`` and a ConvNeXt map
``[V, 3072, 32, 32]`` pooled 2x2 to the 16x16 grid, D = 2048 and 4096, V = 5, 20, 80 (5, 20 with
--quick), rows scattered into a shuffled packed sequence, LayerNorm on. The backward is the one of a
SPHINX-X step: frozen encoders, so gradients for the projection and norm parameters only.
On the CPU: the same at V = 2, D = 256, channels / 8, in float32 (the Triton interpreter is not
timed).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.harness import RESULTS_DIR, backends_to_time, peak_memory_mb, run_family, time_ms
from benchmarks.rows import Row, compute_row
from sphinx_kernels.dtypes import dtype_name
from sphinx_kernels.ops.patch_projection import (
    PATCH_PROJECTION_BACKENDS,
    feature_layouts,
    patch_projection,
    patch_projection_reference,
    resample_reference,
)

INPUT_SETS = 2
GRID = 16
EAGER, COMPILED, GEMM = "torch eager chain", "torch.compile chain", "bare GEMM (concat)"


def projection_inputs(views, width, channels, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen) * scale).to(dtype).to(device)

    features = [rand(views, 1 + GRID * GRID, channels[0]),
                rand(views, channels[1], 2 * GRID, 2 * GRID)]
    rows = views * (1 + GRID * GRID)
    in_features = sum(channels)
    params = {"weight": rand(width, in_features, scale=in_features ** -0.5), "bias": rand(width),
              "norm_weight": 1 + rand(width, scale=0.1), "norm_bias": rand(width, scale=0.1)}
    for p in params.values():
        p.requires_grad_(True)
    packed = rand(rows + 4 * views, width)  # text tokens between the images
    out_rows = torch.randperm(packed.shape[0], generator=gen)[:rows].to(device)
    # The bare GEMM's input: the concatenation the fused op never materialises, made beforehand.
    layouts = feature_layouts(features, (GRID, GRID))
    concat = torch.cat([resample_reference(f, layout, (GRID, GRID))
                        for f, layout in zip(features, layouts)], dim=-1).flatten(0, 1)
    return {"features": features, "params": params, "packed": packed, "out_rows": out_rows,
            "concat": concat, "grad": rand(packed.shape[0], width), "grad_rows": rand(rows, width)}


def fused(a, backend):
    p = a["params"]
    return patch_projection(a["features"], p["weight"], p["bias"], grid=GRID,
                            norm_weight=p["norm_weight"], norm_bias=p["norm_bias"], out=a["packed"],
                            out_rows=a["out_rows"], backend=backend)


def chain(a):
    p = a["params"]
    return patch_projection_reference(a["features"], p["weight"], p["bias"], grid=GRID,
                                      norm_weight=p["norm_weight"], norm_bias=p["norm_bias"],
                                      out=a["packed"], out_rows=a["out_rows"])


def bare_gemm(a):
    return F.linear(a["concat"], a["params"]["weight"], a["params"]["bias"])


def with_backward(forward, params, grad_key):
    """``forward`` then the gradients of ``params`` (the encoders are frozen: none for features)."""
    def step(a):
        return torch.autograd.grad(forward(a), [a["params"][k] for k in params], a[grad_key])
    return step


def bench_patch_projection(device: torch.device, quick: bool,
                           ceiling_gbps: float | None) -> list[Row]:
    if device.type == "cuda":
        dtype, channels = torch.bfloat16, (1536, 3072)
        cases = [(v, d) for d in (2048, 4096) for v in ((5, 20) if quick else (5, 20, 80))]
    else:
        dtype, channels, cases = torch.float32, (192, 384), [(2, 256)]
    compiled_chain = torch.compile(chain, fullgraph=True)
    kernel_backends = backends_to_time(PATCH_PROJECTION_BACKENDS, device, dtype)
    rows = []
    for views, width in cases:
        sets = [projection_inputs(views, width, channels, dtype, device, seed)
                for seed in range(INPUT_SETS)]
        shape = f"V={views} D={width} C={channels[0]}+{channels[1]}"
        gemm_flops = 2 * views * (1 + GRID * GRID) * sum(channels) * width
        for op, flops, backward in (("forward", gemm_flops, False),
                                    ("forward+backward", 2 * gemm_flops, True)):
            subjects = {f"fused {b}": (lambda a, b=b: fused(a, b)) for b in kernel_backends
                        if b != "reference"}
            subjects.update({EAGER: chain, COMPILED: compiled_chain, GEMM: bare_gemm})
            timed = {}
            for name, forward in subjects.items():
                if not backward:
                    fn = forward
                elif name == GEMM:
                    fn = with_backward(forward, ("weight", "bias"), "grad_rows")
                else:
                    fn = with_backward(forward, ("weight", "bias", "norm_weight", "norm_bias"),
                                       "grad")
                with torch.enable_grad() if backward else torch.no_grad():
                    ms = time_ms(fn, sets, device)
                    peak = peak_memory_mb(fn, sets[0], device)
                timed[name] = (ms, peak)
            gemm_tflops = flops / timed[GEMM][0] / 1e9
            for name, (ms, peak) in timed.items():
                rows.append(compute_row(op, shape, dtype_name(dtype), name, ms,
                                        flops, gemm_tflops, peak_mib=peak))
    return rows


def run(device: torch.device, quick: bool, results_dir: str = RESULTS_DIR) -> list[Row]:
    subjects = [f"fused {b}" for b in PATCH_PROJECTION_BACKENDS.names if b != "reference"]
    return run_family("projection", device, quick, (bench_patch_projection,), subjects,
                      (EAGER, COMPILED, GEMM), results_dir=results_dir)
