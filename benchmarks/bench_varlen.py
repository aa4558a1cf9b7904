"""Benchmarks of kernel family 1 (packed sequences), in GB/s next to the measured copy bandwidth.

    python -m benchmarks --family varlen [--quick]

gather_rows against index_select on one table and the reference: on the CPU 10^5 rows x 257 float32
from three sources; on a GPU 10^6 rows x 4096 in fp32, fp16 and bf16.
find_padding_tiles against the reference: a batch of images of 3x3 tiles of 448 px (fewer on the CPU).
varlen_attention (causal, forward and forward + backward, TFLOP/s of the visible pairs only: see
``benchmarks.counts.attention_flops``) against torch_flash (FlashAttention-2 bundled with torch), FlexAttention
with a document-mask BlockMask, SDPA on the batch padded to its longest sequence, and the reference: on
a GPU 16k tokens (4k with --quick) in sequences of 1 to 4096 tokens, 32 query and 8 kv heads, D = 128,
bf16; on the CPU 4 sequences, 512 tokens, 4 / 2 heads, D = 64, float32 (reference and padded SDPA
only: the Triton interpreter is not timed, FlexAttention is GPU-only here).
"""
from __future__ import annotations

import random

import torch

from benchmarks.counts import attention_flops
from benchmarks.harness import (Row, backends_to_time, bandwidth_row, compute_row, run_family,
                                time_ms)
from sphinx_kernels.backends import Request
from sphinx_kernels.varlen import (FIND_PADDING_TILES_BACKENDS, GATHER_ROWS_BACKENDS,
                                   VARLEN_ATTENTION_BACKENDS, find_padding_tiles, gather_rows,
                                   varlen_attention)

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


def attention_lengths(total: int, longest: int, seed: int) -> list[int]:
    """Sequence lengths from 1 to ``longest`` summing to ``total`` (a packed training batch)."""
    rng = random.Random(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(min(rng.randint(1, longest), total - sum(lengths)))
    return lengths


def attention_inputs(lengths, heads, kv_heads, head_dim, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, grad = (torch.randn(total, heads, head_dim, generator=gen).to(dtype).to(device)
               for _ in "qg")
    k, v = (torch.randn(total, kv_heads, head_dim, generator=gen).to(dtype).to(device) for _ in "kv")
    cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
    return {"q": q, "k": k, "v": v, "grad": grad, "cu": cu, "max": max(lengths)}


def padded_sdpa(lengths, heads, kv_heads, device):
    """Attention on the batch padded to its longest sequence: scatter to ``[B, H, L, D]``, one causal
    SDPA call, gather back (the copies are part of the cost)."""
    longest, num = max(lengths), len(lengths)
    # Token t of sequence b goes to padded row b * longest + t.
    rows = torch.cat([b * longest + torch.arange(n) for b, n in enumerate(lengths)]).to(device)
    group = heads // kv_heads

    def pad(x):
        out = x.new_zeros((num * longest,) + tuple(x.shape[1:]))
        out[rows] = x
        return out.view(num, longest, *x.shape[1:]).transpose(1, 2)

    def run(a):
        k, v = (pad(t).repeat_interleave(group, dim=1) for t in (a["k"], a["v"]))
        out = torch.nn.functional.scaled_dot_product_attention(pad(a["q"]), k, v, is_causal=True)
        return out.transpose(1, 2).reshape(num * longest, heads, -1)[rows]
    return run


def flex_document_attention(lengths, heads, kv_heads, device):
    """FlexAttention over the packed tokens with a causal document mask (a BlockMask built once)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)
    total = doc.shape[0]

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    mask = create_block_mask(document_causal, None, None, total, total, device=device)
    compiled = torch.compile(flex_attention)

    def run(a):
        q, k, v = (t.transpose(0, 1)[None] for t in (a["q"], a["k"], a["v"]))
        return compiled(q, k, v, block_mask=mask, enable_gqa=heads != kv_heads)[0].transpose(0, 1)
    return run


def bench_varlen_attention(device: torch.device, quick: bool) -> list[Row]:
    if device.type == "cuda":
        lengths = attention_lengths(4096 if quick else 16384, 4096, seed=0)
        heads, kv_heads, head_dim, dtype = 32, 8, 128, torch.bfloat16
    else:
        lengths, heads, kv_heads, head_dim, dtype = [200, 7, 240, 65], 4, 2, 64, torch.float32
    sets = [attention_inputs(lengths, heads, kv_heads, head_dim, dtype, device, seed)
            for seed in range(INPUT_SETS)]
    shape = f"T={sum(lengths)} B={len(lengths)} H={heads}/{kv_heads} D={head_dim}"
    dtype_name = str(dtype).removeprefix("torch.")
    request = Request(device, dtype, {"head_dim": head_dim, "causal": True, "prefix": False,
                                      "max_seqlen": True, "deterministic": False})
    subjects = {
        name: (lambda a, b=name: varlen_attention(a["q"], a["k"], a["v"], a["cu"],
                                                  max_seqlen_q=a["max"], backend=b))
        for name in backends_to_time(VARLEN_ATTENTION_BACKENDS, request)}
    subjects["padded SDPA"] = padded_sdpa(lengths, heads, kv_heads, device)
    if device.type == "cuda":
        try:
            subjects["FlexAttention"] = flex_document_attention(lengths, heads, kv_heads, device)
        except (ImportError, RuntimeError) as error:  # torch without FlexAttention for this GPU
            print(f"FlexAttention skipped: {error}")
    rows = []
    for backward, op in ((False, "attention fwd"), (True, "attention fwd+bwd")):
        flops = attention_flops(lengths, num_heads=heads, head_dim=head_dim)
        if backward:
            flops += attention_flops(lengths, num_heads=heads, head_dim=head_dim, backward=True)
        for name, forward in subjects.items():
            if backward:
                def step(a, forward=forward):
                    inputs = {**a, **{n: a[n].detach().requires_grad_() for n in "qkv"}}
                    forward(inputs).backward(a["grad"])
            else:
                step = forward
            with torch.set_grad_enabled(backward):
                ms = time_ms(step, sets, device)
            rows.append(compute_row(op, shape, dtype_name, name, ms, flops, size=sum(lengths)))
    return rows


def bench_family(device: torch.device, quick: bool, ceiling_gbps: float | None) -> list[Row]:
    return (bench_gather_rows(device, quick, ceiling_gbps)
            + bench_find_padding_tiles(device, quick, ceiling_gbps)
            + bench_varlen_attention(device, quick))


def run(device: torch.device, quick: bool) -> list[Row]:
    return run_family("varlen", device, quick, bench_family, ("cuda", "cpp", "triton"),
                      ("reference", "torch.index_select", "triton", "torch_flash", "FlexAttention",
                       "padded SDPA"))
