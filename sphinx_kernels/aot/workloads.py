"""The workloads whose Triton launches the check compiles: every public op with a Triton backend, at
the sizes of a SPHINX-X training step, forward and backward, in every dtype the kernels take.

Sizes (the real presets of ``sphinx_model.config``): 16k packed tokens in 8 samples; 32 query and 8
key/value heads of 64 (TinyLlama-like) and 128 (InternLM2 / Mixtral) dims, causal, and prefix-LM at
128 in bfloat16, rotary with float32 tables; ``gather_rows`` at width 4096; ``find_padding_tiles``
on 1344-px images cut into 3x3 and 2x2 tiles; the projection of DINOv2-g (1536 channels) and
ConvNeXt-XXL (3072) to 4096 on the 16x16 grid, the encoders in every layout the kernels read
differently (tokens with and without a CLS token, NCHW and channels-last maps), at the grid's size,
pooled 2x2 from 32x32 and repeated 2x2 from 8x8, with LayerNorm into a packed sequence, and once
without; Mixtral's MoE layer (E = 8, k = 2, H = 4096, F = 14336, block 128), with and without
recomputation.

Each workload is a function run inside :func:`sphinx_kernels.aot.record.fake_gpu`: tensors are fake
``cuda`` tensors, and every input that requires grad gets the op's backward launches recorded too.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

import sphinx_kernels as sk
from sphinx_kernels import nn
from sphinx_kernels.ops.varlen_attention import MAX_ATTENTION_HEAD_DIM

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TOKENS = 16384
SEQUENCES = 8
HEADS, KV_HEADS = 32, 8
HEAD_DIMS = (64, 128)
POSITIONS = 4096
WIDTH = 4096
VOCAB = 32000
IMAGE, TILES = 1344, (448, 672)
VIEWS = 40                          # 8 images of a global view and 2x2 tiles
GRID = 16
DINOV2, CONVNEXT = 1536, 3072
EXPERTS, TOP_K, FFN = 8, 2, 14336

# An encoder's source grid per resampling: the grid itself, twice its size (pooled 2x2), half of it
# (repeated 2x2).
RESAMPLINGS = {"same": GRID, "pooled": 2 * GRID, "repeated": GRID // 2}


def _cuda(*shape, dtype=torch.float32, grad=False) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="cuda", requires_grad=grad)


def _indices(size: int, dtype=torch.int32) -> torch.Tensor:
    return torch.empty(size, dtype=dtype, device="cuda")


def attention(dtype: torch.dtype, head_dim: int, prefix: bool) -> None:
    """One decoder layer's attention as ``VarlenSelfAttention`` runs it: q, k, v views of a fused
    projection, rotary on (q, k), causal varlen attention (prefix-LM when ``prefix``)."""
    qkv = _cuda(TOKENS, (HEADS + 2 * KV_HEADS) * head_dim, dtype=dtype, grad=True)
    q, k, v = qkv.view(TOKENS, -1, head_dim).split([HEADS, KV_HEADS, KV_HEADS], dim=1)
    cos, sin = _cuda(POSITIONS, head_dim), _cuda(POSITIONS, head_dim)
    q, k = sk.apply_rotary((q, k), cos, sin, _indices(TOKENS))
    prefix_lens = _indices(SEQUENCES) if prefix else None
    sk.varlen_attention(q, k, v, _indices(SEQUENCES + 1), max_seqlen_q=POSITIONS,
                        max_seqlen_k=POSITIONS, causal=True, prefix_lens=prefix_lens)


def gather(dtype: torch.dtype) -> None:
    """The packed input embeddings: token table, projected visual rows, the special vectors."""
    sources = [_cuda(VOCAB, WIDTH, dtype=dtype, grad=True),
               _cuda(VIEWS * (1 + GRID * GRID), WIDTH, dtype=dtype, grad=True),
               _cuda(3, WIDTH, dtype=dtype, grad=True)]
    sk.gather_rows(sources, _indices(TOKENS), _indices(TOKENS))


def padding_tiles(dtype: torch.dtype, tile: int) -> None:
    sk.find_padding_tiles(_cuda(8, 3, IMAGE, IMAGE, dtype=dtype), tile, (0.48, 0.46, 0.41))


def _encoder(kind: str, channels: int, side: int, dtype: torch.dtype) -> torch.Tensor:
    """One encoder's output in layout ``kind``: ``cls`` tokens ``[V, 1 + n*n, C]``, ``tokens``
    ``[V, n*n, C]``, ``nchw`` map ``[V, C, n, n]`` or ``nhwc`` (the same map, channels last)."""
    if kind == "cls":
        return _cuda(VIEWS, 1 + side * side, channels, dtype=dtype, grad=True)
    if kind == "tokens":
        return _cuda(VIEWS, side * side, channels, dtype=dtype, grad=True)
    if kind == "nchw":
        return _cuda(VIEWS, channels, side, side, dtype=dtype, grad=True)
    return _cuda(VIEWS, side, side, channels, dtype=dtype, grad=True).permute(0, 3, 1, 2)


def projection(dtype: torch.dtype, dinov2: tuple[str, str], convnext: tuple[str, str],
               norm: bool = True) -> None:
    """``patch_projection`` of (layout, resampling) pairs of both encoders into 4096, LayerNorm-ed
    into rows of a packed sequence (``norm``), else straight into them."""
    features = [_encoder(dinov2[0], DINOV2, RESAMPLINGS[dinov2[1]], dtype),
                _encoder(convnext[0], CONVNEXT, RESAMPLINGS[convnext[1]], dtype)]
    params = {name: _cuda(*shape, dtype=dtype, grad=True) for name, shape in (
        ("weight", (WIDTH, DINOV2 + CONVNEXT)), ("bias", (WIDTH,)),
        *((("norm_weight", (WIDTH,)), ("norm_bias", (WIDTH,))) if norm else ()))}
    sk.patch_projection(features, grid=GRID, out=_cuda(TOKENS, WIDTH, dtype=dtype, grad=True),
                        out_rows=_indices(VIEWS * (1 + GRID * GRID)), **params)


def moe(dtype: torch.dtype, recompute: bool) -> None:
    """Mixtral-8x7B's sparse MoE layer (gating, routing, permutation, expert MLP, unpermutation)."""
    layer = nn.MoEMLP(WIDTH, FFN, EXPERTS, TOP_K, block_size=128, recompute=recompute,
                      device="cuda", dtype=dtype)
    layer(_cuda(TOKENS, WIDTH, dtype=dtype, grad=True))


# Each encoder's (layout, resampling). The kernels read an encoder one of two ways (channels
# contiguous: tokens and channels-last maps; pixels contiguous: NCHW maps), resampled one of three
# ways, and take its global row from a CLS token or the grid's mean. These pairs hold every
# (way of reading, resampling) and every (way of reading, global row) there is.
_PROJECTION_PAIRS = (
    (("cls", "same"), ("nchw", "same")),         # the SPHINX-X configuration
    (("cls", "pooled"), ("nchw", "pooled")),
    (("cls", "repeated"), ("nchw", "repeated")),
    (("tokens", "same"), ("nhwc", "same")),
)


@dataclass(frozen=True)
class Workload:
    """One call of a public op (or module) at real sizes, forward and backward."""

    name: str        # "op details"
    dtype: str       # the data's dtype ("bfloat16"), which the launches it makes are checked for
    run: Callable[[], None]


def workloads(dtypes=DTYPES) -> list[Workload]:
    """Every workload, dtype by dtype."""
    cases: list[Workload] = []
    for dtype in dtypes:
        def add(name, fn, *args, dtype=dtype, **kwargs):
            cases.append(Workload(name, str(dtype).removeprefix("torch."),
                                  partial(fn, dtype, *args, **kwargs)))
        for head_dim in HEAD_DIMS:
            add(f"attention D={head_dim} causal", attention, head_dim, False)
        if dtype == torch.bfloat16:
            # The prefix changes a mask bound, not the tiles (measured: the same shared memory,
            # registers within a few): at the SPHINX-X head dim and training dtype only. The
            # largest head dim the op takes (no preset uses it; its own tiles) likewise: float16
            # compiles to the same tiles.
            add(f"attention D={HEAD_DIMS[-1]} prefix", attention, HEAD_DIMS[-1], True)
            add(f"attention D={MAX_ATTENTION_HEAD_DIM} causal", attention, MAX_ATTENTION_HEAD_DIM,
                False)
        add(f"gather_rows width={WIDTH}", gather)
        for tile in TILES:
            add(f"find_padding_tiles {IMAGE}px tile={tile}", padding_tiles, tile)
        for dinov2, convnext in _PROJECTION_PAIRS:
            add(f"patch_projection dinov2 {'/'.join(dinov2)} + convnext {'/'.join(convnext)}",
                projection, dinov2, convnext)
        add("patch_projection no norm", projection, *_PROJECTION_PAIRS[0], norm=False)
        for recompute in (False, True):
            suffix = " recompute" if recompute else ""
            add(f"moe E={EXPERTS} k={TOP_K} H={WIDTH} F={FFN}{suffix}", moe, recompute)
    return cases
