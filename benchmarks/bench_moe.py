"""Benchmarks of kernel family 3 (MoE routing): gating, the routing plan, permute and unpermute,
against a PyTorch eager baseline (softmax + topk, and a torch.sort-based permutation).

    python -m benchmarks --family moe [--quick]

On the CPU: T=4096 tokens, E=8 experts, k=2, H=256 in float32 (the Triton interpreter is not timed).
On a GPU: Mixtral-8x7B sizes, T=8192 (2048 with --quick), E=8, k=2, H=4096, in float32 and bfloat16,
in GB/s next to the measured copy bandwidth.
"""
from __future__ import annotations

import torch

from benchmarks.harness import Row, backends_to_time, bandwidth_row, run_family, time_ms
from sphinx_kernels.backends import Request
from sphinx_kernels.moe import (MOE_PERMUTE_BACKENDS, MOE_ROUTING_BACKENDS, MOE_UNPERMUTE_BACKENDS,
                                TOPK_GATING_BACKENDS, moe_permute, moe_routing, moe_unpermute,
                                topk_gating)

INPUT_SETS = 3
NUM_EXPERTS, TOP_K, BLOCK_SIZE = 8, 2, 128
EAGER = "torch eager (sort)"


def eager_gating(logits):
    """softmax in float32, top-k, renormalisation: what a Mixtral router does in PyTorch."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, expert_ids = probs.topk(TOP_K, dim=-1)
    return weights / weights.sum(-1, keepdim=True), expert_ids


def eager_routing(expert_ids):
    """The usual dropless permutation: a stable sort of the flattened expert ids and its inverse."""
    order = torch.sort(expert_ids.reshape(-1), stable=True).indices
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.shape[0], device=order.device)
    return order, inverse


def eager_permute(x, order):
    return x.index_select(0, order // TOP_K)


def eager_unpermute(y_sorted, inverse, weights):
    rows = y_sorted.index_select(0, inverse).view(*weights.shape, -1)
    return (rows.float() * weights[:, :, None]).sum(1).to(y_sorted.dtype)


def moe_inputs(num_tokens, hidden, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, NUM_EXPERTS, generator=gen).to(dtype).to(device)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype).to(device)
    weights, expert_ids = eager_gating(logits)
    plan = moe_routing(expert_ids.int(), NUM_EXPERTS, block_size=BLOCK_SIZE, backend="reference")
    grouped = moe_permute(x, plan, backend="reference")
    order, inverse = eager_routing(expert_ids)
    return {"logits": logits, "x": x, "weights": weights, "expert_ids": expert_ids.int(),
            "plan": plan, "grouped": grouped, "order": order, "inverse": inverse,
            "sorted": eager_permute(x, order)}


def bench_moe(device: torch.device, quick: bool, ceiling_gbps: float | None) -> list[Row]:
    if device.type == "cuda":
        num_tokens, hidden = (2048 if quick else 8192), 4096
        dtypes = (torch.float32, torch.bfloat16)
    else:
        num_tokens, hidden, dtypes = (1024 if quick else 4096), 256, (torch.float32,)
    shape = f"T={num_tokens} E={NUM_EXPERTS} k={TOP_K} H={hidden}"
    rows = []
    for dtype in dtypes:
        sets = [moe_inputs(num_tokens, hidden, dtype, device, seed) for seed in range(INPUT_SETS)]
        dtype_name = str(dtype).removeprefix("torch.")
        size = sets[0]["x"].element_size()
        pairs = num_tokens * TOP_K
        # Bytes each op must move: gating reads the logits and writes k (gate, id) pairs; routing
        # reads the ids and writes a position per pair and a pair per grouped row; permute reads each
        # token once and writes its k rows; unpermute reads the k rows and writes the token.
        padded_rows = sets[0]["plan"].num_padded_rows
        cases = [
            ("topk_gating", TOPK_GATING_BACKENDS, dtype,
             num_tokens * NUM_EXPERTS * size + pairs * 8,
             lambda a, b: topk_gating(a["logits"], TOP_K, backend=b),
             lambda a: eager_gating(a["logits"])),
            ("moe_routing", MOE_ROUTING_BACKENDS, torch.int32, pairs * 8 + padded_rows * 4,
             lambda a, b: moe_routing(a["expert_ids"], NUM_EXPERTS, block_size=BLOCK_SIZE,
                                      backend=b),
             lambda a: eager_routing(a["expert_ids"])),
            ("moe_permute", MOE_PERMUTE_BACKENDS, dtype, (num_tokens + pairs) * hidden * size,
             lambda a, b: moe_permute(a["x"], a["plan"], backend=b),
             lambda a: eager_permute(a["x"], a["order"])),
            ("moe_unpermute", MOE_UNPERMUTE_BACKENDS, dtype, (num_tokens + pairs) * hidden * size,
             lambda a, b: moe_unpermute(a["grouped"], a["plan"], a["weights"], backend=b),
             lambda a: eager_unpermute(a["sorted"], a["inverse"], a["weights"])),
        ]
        for op, registry, request_dtype, moved, run_op, run_eager in cases:
            for backend in backends_to_time(registry, Request(device, request_dtype)):
                ms = time_ms(lambda a, b=backend: run_op(a, b), sets, device)
                rows.append(bandwidth_row(op, shape, dtype_name, backend, ms, moved, ceiling_gbps))
            ms = time_ms(run_eager, sets, device)
            rows.append(bandwidth_row(op, shape, dtype_name, EAGER, ms, moved, ceiling_gbps))
    return rows


def run(device: torch.device, quick: bool) -> list[Row]:
    return run_family("moe", device, quick, bench_moe, ("triton", "reference"), (EAGER,))
