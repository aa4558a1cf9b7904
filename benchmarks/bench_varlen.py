"""Benchmarks of kernel family 1 (packed sequences), in GB/s next to the measured copy bandwidth.

    python -m benchmarks --family varlen [--quick]

gather_rows against index_select on one table and the reference: on the CPU 10^5 rows x 257 float32
from three sources; on a GPU 10^6 rows x 4096 in fp32, fp16 and bf16.
find_padding_tiles against the reference: a batch of images of 3x3 tiles of 448 px (fewer on the
CPU). varlen_attention, causal and prefix-LM (each sequence's first third bidirectional), forward,
backward (through a graph built beforehand) and both, in TFLOP/s of the visible pairs only (see
``benchmarks.counts.attention_flops``), against every backend that serves the mask (torch_flash and
flash_attn: causal only), FlexAttention with a document BlockMask of either kind (the mask's build
time in rows of its own), flash-attn's and xformers' own varlen calls when installed, SDPA on the
batch padded to its longest sequence (causal), and the reference: on
a GPU 16k tokens (4k with --quick) in sequences of 1 to 4096 tokens, 32 query and 8 kv heads, D =
128, bf16; on the CPU 4 sequences, 512 tokens, 4 / 2 heads, D = 64, float32 (reference and padded
SDPA only: the Triton interpreter is not timed, FlexAttention is GPU-only here).
varlen_attention of one decode step (one query row per sequence against a KV cache laid out as
``sphinx_model.generate``'s, gaps between the sequences' slots), forward, against SDPA on the cache
left-padded to the longest sequence (transformers' generate): on a GPU 32 sequences of 16..1536
cached keys, 32 / 4 heads, D = 64, bf16; on the CPU 8 sequences of 16..512, 4 / 2 heads, D = 32,
float32 (the tiny presets' attention).
plan_layout (CPU only), in GB/s of the outputs written, next to a bare fill of those outputs:
cpp against the reference on 10^4 samples (2000 with --quick) of a heavy mix (0-3 images, tile grids
1x1..4x4, 30% of tiles skipped, 257 tokens per view, 32..2048 text tokens: about 3100 packed rows a
sample); without --quick also cpp alone on 10^5 samples in one call, of SPHINX-X's shape (one image
as 2x2 tiles plus the global view, 32..256 text tokens: about 1430 rows a sample) and of the heavy
mix, and 10^5 one-image samples planned 16 at a time (the data loader's calls).
pack_by_token_budget (CPU only): first-fit decreasing of 10^5 lengths in 32..2048 into 16384-token
bins. apply_rotary against transformers' own ``apply_rotary_pos_emb`` of Llama in eager PyTorch
(when transformers is installed): q [T, 32, 128] and k [T, 8, 128] (Llama GQA), T = 16384 on a GPU
in fp32, fp16, bf16; T = 2048 float32 on the CPU.
"""
from __future__ import annotations

import random

import torch

from benchmarks import transformers_baselines
from benchmarks.counts import attention_flops
from benchmarks.harness import RESULTS_DIR, backends_to_time, bandwidth_rows, run_family, time_ms
from benchmarks.peers import peer_missing
from benchmarks.rows import Row, bandwidth_row, compute_row
from sphinx_kernels.dtypes import dtype_name
from sphinx_kernels.nn import rotary_tables
from sphinx_kernels.ops.apply_rotary import APPLY_ROTARY_BACKENDS, apply_rotary
from sphinx_kernels.ops.find_padding_tiles import FIND_PADDING_TILES_BACKENDS, find_padding_tiles
from sphinx_kernels.ops.gather_rows import GATHER_ROWS_BACKENDS, gather_rows
from sphinx_kernels.ops.pack_by_token_budget import (
    PACK_BY_TOKEN_BUDGET_BACKENDS,
    pack_by_token_budget,
)
from sphinx_kernels.ops.plan_layout import PLAN_LAYOUT_BACKENDS, LayoutInputs, plan_layout
from sphinx_kernels.ops.varlen_attention import VARLEN_ATTENTION_BACKENDS, varlen_attention
from sphinx_kernels.platforms import CPP

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
        # Each row read once and written once.
        moved = 2 * num_rows * width * sets[0][0][0].element_size()
        shape = f"T={num_rows} D={width} S=3"
        rows += bandwidth_rows("gather_rows", GATHER_ROWS_BACKENDS,
                               lambda a, b: gather_rows(*a, backend=b), sets, device, dtype,
                               shape, moved, ceiling_gbps)
        # The peer: one index_select from a single table of the same rows (no source choice to
        # make).
        single = [(torch.cat(s[0]), s[2].long()) for s in sets]
        ms = time_ms(lambda a: a[0].index_select(0, a[1]), single, device)
        rows.append(bandwidth_row("gather_rows", shape, dtype_name(dtype), "torch.index_select",
                                  ms, moved, ceiling_gbps))
    return rows


def bench_find_padding_tiles(device: torch.device, quick: bool,
                             ceiling_gbps: float | None) -> list[Row]:
    num = (4 if quick else 16) if device.type == "cuda" else 2
    tile, dtype = 448, torch.bfloat16 if device.type == "cuda" else torch.float32
    sets = []
    for seed in range(INPUT_SETS):
        images = torch.randn(num, 3, 3 * tile, 3 * tile,
                             generator=torch.Generator().manual_seed(seed))
        images[:, :, tile:] = 0.0  # the lower two rows of tiles are padding: those are read whole
        sets.append(images.to(dtype).to(device))
    moved = sets[0].numel() * sets[0].element_size()
    shape = f"N={num} 3x{3 * tile}x{3 * tile} tile={tile}"
    return bandwidth_rows("find_padding_tiles", FIND_PADDING_TILES_BACKENDS,
                          lambda x, b: find_padding_tiles(x, tile, 0.0, backend=b), sets, device,
                          dtype, shape, moved, ceiling_gbps)


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
    k, v = (torch.randn(total, kv_heads, head_dim, generator=gen).to(dtype).to(device)
            for _ in "kv")
    cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
    return {"q": q, "k": k, "v": v, "grad": grad, "cu": cu, "max": max(lengths)}


def padded_sdpa(lengths, heads, kv_heads, device):
    """Attention on the batch padded to its longest sequence: scatter to ``[B, H, L, D]``, one
    causal SDPA call, gather back (the copies are part of the cost)."""
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


def flex_document_attention(lengths, heads, kv_heads, device, prefix=None):
    """FlexAttention over the packed tokens with a causal document mask, or with ``prefix`` (host
    ints, one per sequence) a prefix-LM document mask. Returns the run function and the milliseconds
    of building its BlockMask (done once per batch, outside the timed call)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    sizes = torch.tensor(lengths)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), sizes).to(device)
    start = (torch.cumsum(sizes, 0) - sizes).to(device)
    prefix_of = torch.tensor(prefix or [0] * len(lengths)).to(device)
    total = doc.shape[0]

    def document_mask(b, h, q_idx, kv_idx):
        visible = (q_idx >= kv_idx) | (kv_idx - start[doc[kv_idx]] < prefix_of[doc[kv_idx]])
        return (doc[q_idx] == doc[kv_idx]) & visible

    def build(_):
        return create_block_mask(document_mask, None, None, total, total, device=device)

    build_ms = time_ms(build, [None], device, warmup=1, repeats=5)
    mask = build(None)
    compiled = torch.compile(flex_attention)

    def run(a):
        q, k, v = (t.transpose(0, 1)[None] for t in (a["q"], a["k"], a["v"]))
        return compiled(q, k, v, block_mask=mask, enable_gqa=heads != kv_heads)[0].transpose(0, 1)
    return run, build_ms


def flash_attn_varlen(lengths):
    """flash-attn's own varlen kernel (``flash_attn_varlen_func``: GQA natively, causal)."""
    from flash_attn import flash_attn_varlen_func
    longest = max(lengths)

    def run(a):
        return flash_attn_varlen_func(a["q"], a["k"], a["v"], a["cu"], a["cu"], longest, longest,
                                      causal=True)
    return run


def xformers_block_diagonal(lengths, heads, kv_heads):
    """xformers' memory-efficient attention with a block-diagonal causal mask over the packed tokens
    (the mask is built from host lengths once, outside the timed call); GQA through its 5-D layout
    with the kv heads expanded as views, not copies."""
    from xformers.ops import fmha
    bias = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(list(lengths))
    group = heads // kv_heads

    def run(a):
        total, _, dim = a["q"].shape
        q = a["q"].view(1, total, kv_heads, group, dim)
        k, v = (t.view(1, total, kv_heads, 1, dim).expand(1, total, kv_heads, group, dim)
                for t in (a["k"], a["v"]))
        return fmha.memory_efficient_attention(q, k, v, attn_bias=bias).view(total, heads, dim)
    return run


def build_peer(name: str, build):
    """``build()``, or None when the installed peer cannot serve this case (said on stdout)."""
    try:
        return build()
    except (ImportError, RuntimeError, ValueError) as error:
        print(f"{name} skipped: {error}")
        return None


def time_attention(forward, sets, device, direction: str) -> float:
    """Milliseconds of ``forward(inputs)`` ("fwd"), of the backward alone through a graph built
    beforehand ("bwd"), or of both ("fwd+bwd")."""
    def with_grads(a):
        return {**a, **{n: a[n].detach().requires_grad_() for n in "qkv"}}

    if direction == "fwd":
        with torch.no_grad():
            return time_ms(forward, sets, device)
    if direction == "fwd+bwd":
        return time_ms(lambda a: forward(with_grads(a)).backward(a["grad"]), sets, device)
    graphs = []
    for a in sets:
        inputs = with_grads(a)
        graphs.append((forward(inputs), [inputs[n] for n in "qkv"], a["grad"]))
    return time_ms(lambda g: torch.autograd.grad(g[0], g[1], g[2], retain_graph=True), graphs,
                   device)


def bench_varlen_attention(device: torch.device, quick: bool,
                           ceiling_gbps: float | None = None) -> list[Row]:
    """Causal and prefix-LM (the first third of every sequence bidirectional, as an image block)
    attention: forward, backward and both, in TFLOP/s of the pairs the mask lets through."""
    if device.type == "cuda":
        lengths = attention_lengths(4096 if quick else 16384, 4096, seed=0)
        heads, kv_heads, head_dim, dtype = 32, 8, 128, torch.bfloat16
    else:
        lengths, heads, kv_heads, head_dim, dtype = [200, 7, 240, 65], 4, 2, 64, torch.float32
    prefix = [n // 3 for n in lengths]
    sets = [attention_inputs(lengths, heads, kv_heads, head_dim, dtype, device, seed)
            for seed in range(INPUT_SETS)]
    for a in sets:
        a["prefix"] = torch.tensor(prefix, dtype=torch.int32, device=device)
    shape = f"T={sum(lengths)} B={len(lengths)} H={heads}/{kv_heads} D={head_dim}"
    rows, subjects = [], {"causal": {}, "prefix-LM": {}}
    for mask in subjects:
        for name in backends_to_time(VARLEN_ATTENTION_BACKENDS, device, dtype, head_dim=head_dim,
                                     prefix=mask == "prefix-LM"):
            subjects[mask][name] = (
                lambda a, b=name, p=(mask == "prefix-LM"): varlen_attention(
                    a["q"], a["k"], a["v"], a["cu"], max_seqlen_q=a["max"], backend=b,
                    prefix_lens=a["prefix"] if p else None))
    subjects["causal"]["padded SDPA"] = padded_sdpa(lengths, heads, kv_heads, device)
    peers = {"flash_attn": ("flash-attn", lambda: flash_attn_varlen(lengths)),
             "xformers": ("xformers", lambda: xformers_block_diagonal(lengths, heads, kv_heads))}
    if peer_missing("flex_attention", device) is None:  # else listed with its reason
        for mask, flex_prefix in (("causal", None), ("prefix-LM", prefix)):
            built = build_peer("FlexAttention", lambda p=flex_prefix: flex_document_attention(
                lengths, heads, kv_heads, device, p))
            if built is not None:
                subjects[mask]["FlexAttention"], build_ms = built
                rows.append(Row(f"FlexAttention BlockMask build ({mask})", shape, "bool",
                                "FlexAttention", build_ms))
    for peer, (name, build) in peers.items():
        if peer_missing(peer, device) is None:
            built = build_peer(name, build)
            if built is not None:
                subjects["causal"][name] = built
    for mask, by_name in subjects.items():
        prefix_lens = prefix if mask == "prefix-LM" else None
        forward_flops = attention_flops(lengths, num_heads=heads, head_dim=head_dim,
                                        prefix_lens=prefix_lens)
        backward_flops = attention_flops(lengths, num_heads=heads, head_dim=head_dim,
                                         prefix_lens=prefix_lens, backward=True)
        flops = {"fwd": forward_flops, "bwd": backward_flops,
                 "fwd+bwd": forward_flops + backward_flops}
        for direction, count in flops.items():
            for name, forward in by_name.items():
                try:
                    ms = time_attention(forward, sets, device, direction)
                except RuntimeError as error:  # a peer failing one direction keeps the others
                    if name in VARLEN_ATTENTION_BACKENDS.names:
                        raise
                    print(f"{name} skipped for attention {direction} ({mask}): {error}")
                    continue
                rows.append(compute_row(f"attention {direction} ({mask})", shape,
                                        dtype_name(dtype), name, ms, count, size=sum(lengths)))
    return rows


def decode_inputs(cache_lengths, heads, kv_heads, head_dim, dtype, device, seed):
    """One decode step against a KV cache laid out as ``sphinx_model.generate``'s: each sequence's
    keys at the start of its slot (room for 64 more rows after them), one query row each."""
    gen = torch.Generator().manual_seed(seed)
    slots = [n + 64 for n in cache_lengths]
    starts = torch.tensor([0] + slots[:-1]).cumsum(0).tolist()
    q = torch.randn(len(slots), heads, head_dim, generator=gen).to(dtype).to(device)
    k, v = (torch.randn(sum(slots), kv_heads, head_dim, generator=gen).to(dtype).to(device)
            for _ in "kv")
    bounds_k = [0]
    for start, length in zip(starts, cache_lengths):  # a zero-query gap before each sequence
        bounds_k += [start, start + length]
    bounds_q = [0] + [row for j in range(1, len(slots) + 1) for row in (j - 1, j)]
    return {"q": q, "k": k, "v": v, "cu_q": torch.tensor(bounds_q, dtype=torch.int32).to(device),
            "cu_k": torch.tensor(bounds_k, dtype=torch.int32).to(device), "capacity": sum(slots)}


def padded_cache_sdpa(cache_lengths, heads, kv_heads, sets):
    """What transformers' generate runs: the cache as ``[B, Hkv, L, D]`` left-padded to the longest
    sequence (built here for each input set, before any timing: its cache is kept so), keys
    repeated to the query heads, one SDPA call with the padding mask."""
    longest, group = max(cache_lengths), heads // kv_heads
    for a in sets:
        starts = a["cu_k"][1::2].tolist()
        for name in "kv":
            padded = a[name].new_zeros((len(cache_lengths), longest) + tuple(a[name].shape[1:]))
            for b, (start, n) in enumerate(zip(starts, cache_lengths)):
                padded[b, longest - n:] = a[name][start:start + n]
            a[f"padded_{name}"] = padded.transpose(1, 2)
    mask = torch.tensor([[j >= longest - n for j in range(longest)] for n in cache_lengths],
                        device=sets[0]["q"].device)[:, None, None, :]

    def run(a):
        k, v = (a[f"padded_{n}"].repeat_interleave(group, dim=1) for n in "kv")
        out = torch.nn.functional.scaled_dot_product_attention(a["q"][:, :, None], k, v,
                                                               attn_mask=mask)
        return out[:, :, 0]
    return run


def bench_decode_attention(device: torch.device, quick: bool,
                           ceiling_gbps: float | None = None) -> list[Row]:
    """One decode step (a query row per sequence against its cached keys), forward, in TFLOP/s of
    the visible pairs: every backend that serves it, next to SDPA on the left-padded cache."""
    if device.type == "cuda":
        count, longest, heads, kv_heads, head_dim, dtype = 32, 1536, 32, 4, 64, torch.bfloat16
    else:
        count, longest, heads, kv_heads, head_dim, dtype = 8, 512, 4, 2, 32, torch.float32
    rng = random.Random(0)
    cache_lengths = [rng.randint(16, longest) for _ in range(count)]
    sets = [decode_inputs(cache_lengths, heads, kv_heads, head_dim, dtype, device, seed)
            for seed in range(INPUT_SETS)]
    subjects = {name: (lambda a, b=name: varlen_attention(
        a["q"], a["k"], a["v"], a["cu_q"], a["cu_k"], 1, a["capacity"], backend=b))
        for name in backends_to_time(VARLEN_ATTENTION_BACKENDS, device, dtype, head_dim=head_dim,
                                     decode=True)}
    subjects["padded SDPA"] = padded_cache_sdpa(cache_lengths, heads, kv_heads, sets)
    shape = (f"B={count} keys={sum(cache_lengths)} (padded {count * longest}) "
             f"H={heads}/{kv_heads} D={head_dim}")
    flops = attention_flops([1] * count, cache_lengths, num_heads=heads, head_dim=head_dim)
    rows = []
    for name, forward in subjects.items():
        with torch.no_grad():
            ms = time_ms(forward, sets, device)
        rows.append(compute_row("attention decode step", shape, dtype_name(dtype), name, ms,
                                flops, size=count))
    return rows


TOKENS_PER_VIEW = 257


def layout_batch(num_samples: int, seed: int) -> LayoutInputs:
    """A heavy mix: 0-3 images of 1x1..4x4 tiles, 30% skipped, 32..2048 text tokens."""
    gen = torch.Generator().manual_seed(seed)
    text_lens = torch.randint(32, 2049, (num_samples,), generator=gen)
    images = torch.randint(0, 4, (num_samples,), generator=gen)
    grids = torch.randint(1, 5, (int(images.sum()), 2), generator=gen)
    return _layout_inputs(text_lens, images, grids, 0.3, gen)


def one_image_batch(num_samples: int, seed: int) -> LayoutInputs:
    """SPHINX-X's shape of a sample: one image as a 2x2 tile grid plus the global view (5 views,
    none skipped), then 32..256 text tokens."""
    gen = torch.Generator().manual_seed(seed)
    text_lens = torch.randint(32, 257, (num_samples,), generator=gen)
    images = torch.ones(num_samples, dtype=torch.int64)
    return _layout_inputs(text_lens, images, torch.full((num_samples, 2), 2), 0.0, gen)


def _layout_inputs(text_lens, images, grids, skip_fraction, gen) -> LayoutInputs:
    num_text, num_tiles = int(text_lens.sum()), int((grids[:, 0] * grids[:, 1]).sum())
    return LayoutInputs(torch.randint(32000, (num_text,), generator=gen), text_lens,
                        torch.rand(num_text, generator=gen) < 0.5, images, grids,
                        torch.rand(num_tiles, generator=gen) < skip_fraction)


def plan_layout_rows(batch: LayoutInputs, mix: str, backends: list[str]) -> list[Row]:
    """plan_layout of one call over ``batch``, in GB/s of the outputs it writes, next to the bare
    write of those bytes into memory already touched: the CPU's floor for any planner, and the
    ceiling its fractions are of (the device's copy bandwidth says nothing about CPU work)."""
    cpu = torch.device("cpu")
    layout = plan_layout(batch, TOKENS_PER_VIEW)
    written = sum(t.nbytes for t in layout)
    num_samples, packed_rows = batch.text_lens.shape[0], layout.source_ids.shape[0]
    shape = f"{mix} B={num_samples} T={packed_rows}"
    floor_ms = time_ms(lambda outputs: [t.fill_(1) for t in outputs], [layout], cpu, warmup=1,
                       repeats=5)
    floor_gbps = written / floor_ms / 1e6
    rows = []
    for backend in backends:
        ms = time_ms(lambda a, b=backend: plan_layout(a, TOKENS_PER_VIEW, backend=b), [batch], cpu,
                     warmup=1, repeats=5)
        row = bandwidth_row("plan_layout", shape, "int32", backend, ms, written, floor_gbps)
        row.extra = {"samples_per_s": num_samples / ms * 1e3, "rows_per_s": packed_rows / ms * 1e3}
        rows.append(row)
    rows.append(bandwidth_row("plan_layout", shape, "int32", "fill of the outputs (floor)",
                              floor_ms, written, floor_gbps))
    return rows


def plan_layout_per_batch_row(num_samples: int, batch_size: int) -> Row:
    """The data loader's way: ``num_samples`` one-image samples planned ``batch_size`` at a time.
    Small calls are bound by the per-call overhead (validation, dispatch), not by the rows."""
    batches = [one_image_batch(batch_size, seed) for seed in range(num_samples // batch_size)]
    # Counting the rows plans every batch once: that pass is the warm-up.
    packed_rows = sum(plan_layout(b, TOKENS_PER_VIEW).source_ids.shape[0] for b in batches)
    ms = time_ms(lambda group: [plan_layout(b, TOKENS_PER_VIEW) for b in group], [batches],
                 torch.device("cpu"), warmup=0, repeats=3)
    row = Row("plan_layout",
              f"one 2x2 image B={len(batches) * batch_size} in calls of {batch_size}",
              "int32", "cpp", ms)
    row.extra = {"samples_per_s": len(batches) * batch_size / ms * 1e3,
                 "rows_per_s": packed_rows / ms * 1e3, "us_per_call": ms * 1e3 / len(batches)}
    return row


def bench_plan_layout(device: torch.device, quick: bool, ceiling_gbps: float | None) -> list[Row]:
    """CPU data preparation: timed on the CPU whatever the device."""
    backends = backends_to_time(PLAN_LAYOUT_BACKENDS, torch.device("cpu"), torch.int64)
    rows = plan_layout_rows(layout_batch(2000 if quick else 10**4, 0), "heavy mix", backends)
    if not quick:  # 10^5 samples in one call, the planner's throughput (no reference: minutes)
        native = [b for b in backends if b == CPP.name]
        rows += plan_layout_rows(one_image_batch(10**5, 0), "one 2x2 image", native)
        rows += plan_layout_rows(layout_batch(10**5, 0), "heavy mix", native)
        if native:
            rows.append(plan_layout_per_batch_row(10**5, 16))
    return rows


def bench_pack_by_token_budget(device: torch.device, quick: bool,
                               ceiling_gbps: float | None) -> list[Row]:
    """CPU data preparation: timed on the CPU whatever the device."""
    cpu = torch.device("cpu")
    num_lengths, budget = 10**4 if quick else 10**5, 16384
    lengths = [torch.randint(32, 2049, (num_lengths,), generator=torch.Generator().manual_seed(s))
               for s in range(INPUT_SETS)]
    packing = pack_by_token_budget(lengths[0], budget)
    rows = []
    for backend in backends_to_time(PACK_BY_TOKEN_BUDGET_BACKENDS, cpu, torch.int64):
        ms = time_ms(lambda a, b=backend: pack_by_token_budget(a, budget, backend=b), lengths, cpu,
                     warmup=1, repeats=5)
        row = Row("pack_by_token_budget", f"n={num_lengths} budget={budget}", "int64", backend, ms)
        row.extra = {"bins": packing.num_bins, "padding_tokens": packing.padding_tokens,
                     "baseline_padding_tokens": packing.baseline_padding_tokens,
                     "baseline_batch_size": packing.baseline_batch_size}
        rows.append(row)
    return rows


def rotary_inputs(num_tokens, dtype, device, seed, q_heads=32, k_heads=8, dim=128):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(num_tokens, q_heads, dim, generator=gen).to(dtype).to(device)
    k = torch.randn(num_tokens, k_heads, dim, generator=gen).to(dtype).to(device)
    cos, sin = rotary_tables(4096, dim)
    # Packed samples of 1024 tokens: positions reset per sample.
    pos = (torch.arange(num_tokens) % 1024).to(device)
    return (q, k), cos.to(dtype).to(device), sin.to(dtype).to(device), pos


HF_ROTARY = "transformers apply_rotary_pos_emb"


def bench_apply_rotary(device: torch.device, quick: bool, ceiling_gbps: float | None) -> list[Row]:
    if device.type == "cuda":
        num_tokens = 4096 if quick else 16384
        dtypes = (torch.float32, torch.float16, torch.bfloat16)
    else:
        num_tokens, dtypes = (512 if quick else 2048), (torch.float32,)
    hf_rotary = (transformers_baselines.apply_rotary_pos_emb()
                 if peer_missing("transformers", device) is None else None)
    rows = []
    for dtype in dtypes:
        sets = [rotary_inputs(num_tokens, dtype, device, seed) for seed in range(INPUT_SETS)]
        (q, k), cos, _, _ = sets[0]
        # q and k read and written once, and one cos and sin row per token.
        moved = (2 * (q.numel() + k.numel()) + 2 * num_tokens * q.shape[2]) * q.element_size()
        shape = f"T={num_tokens} Hq={q.shape[1]} Hk={k.shape[1]} D={q.shape[2]}"
        rows += bandwidth_rows("apply_rotary", APPLY_ROTARY_BACKENDS,
                               lambda a, b: apply_rotary(*a, backend=b), sets, device, dtype,
                               shape, moved, ceiling_gbps)
        if hf_rotary is not None:  # else listed with its reason among the skipped peers
            ms = time_ms(lambda a: hf_rotary(*a[0], a[1][a[3]], a[2][a[3]], unsqueeze_dim=1), sets,
                         device)
            rows.append(bandwidth_row("apply_rotary", shape, dtype_name(dtype), HF_ROTARY, ms,
                                      moved, ceiling_gbps))
    return rows


BENCHMARKS = (bench_gather_rows, bench_find_padding_tiles, bench_varlen_attention,
              bench_decode_attention, bench_plan_layout, bench_pack_by_token_budget,
              bench_apply_rotary)


def run(device: torch.device, quick: bool, results_dir: str = RESULTS_DIR) -> list[Row]:
    return run_family("varlen", device, quick, BENCHMARKS, ("cuda", "cpp", "triton"),
                      ("reference", "torch.index_select", "triton", "torch_flash", "flash_attn",
                       "flash-attn", "xformers", "FlexAttention", "padded SDPA", HF_ROTARY,
                       "fill of the outputs (floor)"), results_dir=results_dir)
