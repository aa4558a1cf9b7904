"""Triton kernels of ``moe_routing``: a per-block histogram of the expert ids, a prefix sum over
blocks and experts (torch), and a stable scatter of each pair to its row. Contract:
``sphinx_kernels.ops.moe_routing``. No atomics: the plan is deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sphinx_kernels.triton.common import block_of, rows_per_program


@triton.jit
def _expert_one_hot(expert_ids_ptr, i, e, num_pairs):
    expert = tl.load(expert_ids_ptr + i, mask=i < num_pairs, other=-1)
    return (expert[:, None] == e[None, :]).to(tl.int32), expert


@triton.jit
def _block_histogram_kernel(expert_ids_ptr, block_counts_ptr, num_pairs, num_experts,
                            BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    block = tl.program_id(0)
    i = block * BLOCK_N + tl.arange(0, BLOCK_N)
    e = tl.arange(0, BLOCK_E)
    one_hot, _ = _expert_one_hot(expert_ids_ptr, i, e, num_pairs)
    tl.store(block_counts_ptr + block * num_experts + e, tl.sum(one_hot, axis=0),
             mask=e < num_experts)


@triton.jit
def _scatter_positions_kernel(expert_ids_ptr, block_starts_ptr, position_ptr, row_to_pair_ptr,
                              num_pairs, num_experts, num_rows, BLOCK_N: tl.constexpr,
                              BLOCK_E: tl.constexpr):
    block = tl.program_id(0)
    i = block * BLOCK_N + tl.arange(0, BLOCK_N)
    e = tl.arange(0, BLOCK_E)
    one_hot, expert = _expert_one_hot(expert_ids_ptr, i, e, num_pairs)
    # Rank of each pair among the earlier pairs of its expert in this block: stable by construction.
    rank = tl.sum((tl.cumsum(one_hot, axis=0) - 1) * one_hot, axis=1)
    start = tl.load(block_starts_ptr + block * num_experts + expert,
                    mask=(expert >= 0) & (expert < num_experts), other=num_rows)
    position = start + rank
    # An expert id that slipped past validation is placed nowhere: position -1, no write.
    placed = (expert >= 0) & (expert < num_experts) & (position < num_rows)
    tl.store(position_ptr + i, tl.where(placed, position, -1), mask=i < num_pairs)
    tl.store(row_to_pair_ptr + position, i, mask=placed & (i < num_pairs))


def moe_routing(expert_ids: torch.Tensor, num_experts: int, padded_offsets_of, num_rows: int):
    """``padded_offsets_of(tokens_per_expert)`` gives the ``[E + 1]`` block-padded segment starts
    (shared with the reference, so both pad identically)."""
    flat = expert_ids.contiguous().view(-1)
    num_pairs = flat.shape[0]
    device = flat.device
    block_e = block_of(num_experts)
    # Pairs per program: a tile of one-hot rows on a GPU (the rank's cumulative sum keeps it in
    # registers: 80-93 at Mixtral's 8 experts, where 4 tiles took 255 and spilled on sm_90 and
    # sm_80), four under the interpreter (whose cost is per program).
    tiles = 4 if device.type == "cpu" else 1
    block_n = min(rows_per_program(block_e) * tiles, block_of(num_pairs))
    num_blocks = triton.cdiv(num_pairs, block_n)
    block_counts = torch.zeros((num_blocks, num_experts), dtype=torch.int32, device=device)
    position = torch.empty(num_pairs, dtype=torch.int32, device=device)
    row_to_pair = torch.full((num_rows,), -1, dtype=torch.int32, device=device)
    if num_blocks > 0:
        _block_histogram_kernel[(num_blocks,)](
            expert_ids_ptr=flat, block_counts_ptr=block_counts, num_pairs=num_pairs,
            num_experts=num_experts, BLOCK_N=block_n, BLOCK_E=block_e)
    tokens_per_expert = block_counts.sum(0, dtype=torch.int32)
    padded_offsets = padded_offsets_of(tokens_per_expert)
    # Where block b's pairs of expert e start: the expert's segment plus the earlier blocks' counts.
    earlier_blocks = torch.cumsum(block_counts, 0, dtype=torch.int32) - block_counts
    block_starts = (padded_offsets[:-1][None, :] + earlier_blocks).contiguous()
    if num_blocks > 0:
        _scatter_positions_kernel[(num_blocks,)](
            expert_ids_ptr=flat, block_starts_ptr=block_starts, position_ptr=position,
            row_to_pair_ptr=row_to_pair, num_pairs=num_pairs, num_experts=num_experts,
            num_rows=num_rows, BLOCK_N=block_n, BLOCK_E=block_e)
    return tokens_per_expert, padded_offsets, position.view(expert_ids.shape), row_to_pair
