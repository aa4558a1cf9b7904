"""FLOP and byte counts of the benchmarked ops: the useful work only (no padding, no masked-out
score), so TFLOP/s and GB/s compare backends on the same footing whatever each one computes
internally.

Every function is a closed formula or a small loop over sequence lengths; ``tests/test_harness.py``
checks each against hand-computed values.
"""
from __future__ import annotations

from typing import Sequence


def gemm_flops(m: int, n: int, k: int) -> int:
    """``[m, k] @ [k, n]``: one multiply and one add per (row, column, k)."""
    return 2 * m * n * k


def visible_keys(query: int, len_q: int, len_k: int, *, causal: bool, prefix_len: int = 0) -> int:
    """How many keys query ``query`` of a ``len_q``-query, ``len_k``-key sequence attends to, under
    the mask of ``sphinx_kernels.varlen_attention``: the query sits at key position
    ``p = query + len_k - len_q`` (bottom-right alignment) and sees key j iff ``p >= 0`` and
    (``j <= p`` or ``j < prefix_len``) when causal, every key otherwise."""
    if not causal:
        return len_k
    position = query + len_k - len_q
    return 0 if position < 0 else min(len_k, max(position + 1, prefix_len))


def attention_pairs(lens_q: Sequence[int], lens_k: Sequence[int] | None = None, *, causal: bool,
                    prefix_lens: Sequence[int] | None = None) -> int:
    """(query, key) pairs that are visible, summed over the sequences of a packed batch."""
    lens_k = lens_q if lens_k is None else lens_k
    prefix_lens = prefix_lens or [0] * len(lens_q)
    total = 0
    for len_q, len_k, prefix in zip(lens_q, lens_k, prefix_lens):
        if not causal:
            total += len_q * len_k
        elif prefix == 0 and len_q == len_k:
            total += len_q * (len_q + 1) // 2
        else:
            total += sum(visible_keys(i, len_q, len_k, causal=True, prefix_len=prefix)
                         for i in range(len_q))
    return total


def attention_flops(lens_q: Sequence[int], lens_k: Sequence[int] | None = None, *, num_heads: int,
                    head_dim: int, causal: bool = True, prefix_lens: Sequence[int] | None = None,
                    backward: bool = False) -> int:
    """Useful FLOPs of attention over a packed batch: per visible pair and query head, two dot
    products of length ``head_dim`` (``q.k`` and ``p * v``), 4 * head_dim FLOPs. ``backward=True``
    counts the backward alone: five such products per pair (``q.k`` recomputed, dV, dP, dQ, dK),
    2.5x the forward, the convention of flash-attention's benchmarks."""
    forward = 4 * head_dim * num_heads * attention_pairs(lens_q, lens_k, causal=causal,
                                                         prefix_lens=prefix_lens)
    return forward * 5 // 2 if backward else forward


def swiglu_mlp_flops(rows: int, hidden: int, ffn: int, *, backward: bool = False) -> int:
    """A SwiGLU MLP over ``rows`` rows: gate, up and down projections, three GEMMs of ``rows x
    hidden x ffn``; the backward computes two GEMMs per forward GEMM (input and weight
    gradients)."""
    forward = 3 * gemm_flops(rows, ffn, hidden)
    return 2 * forward if backward else forward


def projection_flops(views: int, grid: tuple[int, int], in_channels: int, out_features: int, *,
                     backward: bool = False) -> int:
    """The patch projection's GEMM: ``views * (1 + gh * gw)`` rows of ``in_channels`` into
    ``out_features`` (pooling and LayerNorm are memory-bound and not counted)."""
    rows = views * (1 + grid[0] * grid[1])
    forward = gemm_flops(rows, out_features, in_channels)
    return 2 * forward if backward else forward


def row_copy_bytes(rows: int, width: int, element_size: int) -> int:
    """Moving ``rows`` rows of ``width`` elements: each read once and written once (gather,
    permute)."""
    return 2 * rows * width * element_size
