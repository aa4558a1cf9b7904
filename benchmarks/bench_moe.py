"""Benchmarks of kernel family 3 (MoE): gating, the routing plan, permute and unpermute against a
PyTorch eager baseline (softmax + topk, and a torch.sort-based permutation), in GB/s next to the
measured copy bandwidth; and the expert MLP and the whole MoEMLP layer, forward and backward, in
TFLOP/s of useful FLOPs (3 GEMMs of 2*T*k*H*F forward, twice that backward) against the eager loop
over experts (the Hugging Face way), torch._grouped_mm (bf16 on sm90+, where this torch has it),
megablocks' grouped GEMM when importable, and a dense GEMM of the same FLOPs (the ceiling).

    python -m benchmarks --family moe [--quick]

On the CPU: routing at T=4096 tokens, E=8 experts, k=2, H=256 in float32; the MLP at T=512, H=128,
F=352 (the Triton interpreter is not timed). On a GPU: Mixtral-8x7B sizes, routing at T=8192 (2048
with --quick), H=4096 in float32 and bfloat16; the MLP and the layer at T=4096 (1024), H=4096,
F=14336, E=8, k=2 in bfloat16.
"""
from __future__ import annotations

import torch

from benchmarks.counts import swiglu_mlp_flops
from benchmarks.harness import (
    RESULTS_DIR,
    Row,
    backends_to_time,
    bandwidth_row,
    compute_row,
    run_family,
    time_ms,
)
from benchmarks.peers import peer_missing
from sphinx_kernels.moe import (
    MOE_EXPERT_MLP_BACKENDS,
    MOE_PERMUTE_BACKENDS,
    MOE_ROUTING_BACKENDS,
    MOE_UNPERMUTE_BACKENDS,
    TOPK_GATING_BACKENDS,
    moe_expert_mlp,
    moe_permute,
    moe_routing,
    moe_unpermute,
    topk_gating,
)
from sphinx_kernels.nn import MoEMLP

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
            for backend in backends_to_time(registry, device, request_dtype):
                ms = time_ms(lambda a, b=backend: run_op(a, b), sets, device)
                rows.append(bandwidth_row(op, shape, dtype_name, backend, ms, moved, ceiling_gbps))
            ms = time_ms(run_eager, sets, device)
            rows.append(bandwidth_row(op, shape, dtype_name, EAGER, ms, moved, ceiling_gbps))
    return rows


# ---------------------------------------------------------------------------------------------------
# The expert MLP and the whole layer, in TFLOP/s

LOOP = "torch eager (loop over experts)"
GROUPED_MM = "torch._grouped_mm"
MEGABLOCKS = "megablocks gmm"
DENSE = "dense GEMM (ceiling)"
LAYER = "sphinx MoEMLP"


def swiglu(h1, h3):
    return torch.nn.functional.silu(h1) * h3


def eager_moe_layer(x, router, w1, w3, w2):
    """Mixtral's sparse MoE block as Hugging Face writes it: a loop over experts, each gathering its
    tokens (a host sync per expert) and adding its gate-weighted output back with index_add_."""
    weights, expert_ids = eager_gating(x @ router.T)
    weights = weights.to(x.dtype)
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        token, slot = torch.where(expert_ids == e)
        if token.numel():
            rows = x[token]
            out = swiglu(rows @ w1[e].T, rows @ w3[e].T) @ w2[e].T
            y = y.index_add(0, token, out * weights[token, slot, None])
    return y


def _megablocks_gmm():
    """megablocks' grouped GEMM, ``gmm(a, b, batch_sizes, trans_b)``, or None when it is not usable."""
    from megablocks import grouped_gemm_util
    return grouped_gemm_util.ops.gmm if grouped_gemm_util.grouped_gemm_is_available() else None


def mlp_inputs(num_tokens, hidden, weights, device, seed):
    """One input set for the expert MLP: the block-padded grouped rows (ours), the same rows
    compacted in expert order with their group ends (grouped_mm, megablocks), the tokens (layers)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = weights["w1"].dtype
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype).to(device)
    logits = torch.randn(num_tokens, NUM_EXPERTS, generator=gen).to(device)
    _, expert_ids = eager_gating(logits)
    plan = moe_routing(expert_ids.int(), NUM_EXPERTS, block_size=BLOCK_SIZE)
    order, _ = eager_routing(expert_ids)
    compact = eager_permute(x, order)
    return {"x": x.requires_grad_(True), "plan": plan,
            "grouped": moe_permute(x, plan).requires_grad_(True),
            "compact": compact.requires_grad_(True),
            "ends": torch.cumsum(plan.tokens_per_expert, 0, dtype=torch.int32),
            "sizes": plan.tokens_per_expert.long().cpu(), **weights}


def mlp_implementations(device, dtype):
    """name -> (forward of one input set, the tensors it differentiates)."""
    params = ("w1", "w3", "w2")
    impls = {backend: (lambda a, b=backend: moe_expert_mlp(a["grouped"], a["w1"], a["w3"],
                                                           a["w2"], a["plan"], backend=b),
                       ("grouped",) + params)
             for backend in backends_to_time(MOE_EXPERT_MLP_BACKENDS, device, dtype)}
    if "triton" in impls:
        impls["triton (recompute)"] = (
            lambda a: moe_expert_mlp(a["grouped"], a["w1"], a["w3"], a["w2"], a["plan"],
                                     recompute=True, backend="triton"), ("grouped",) + params)
    # grouped_mm's fast CUTLASS path is bf16 only (peers.py checks the device).
    if peer_missing("torch._grouped_mm", device) is None and dtype == torch.bfloat16:
        def grouped_mm(a):
            mm = lambda rows, w: torch._grouped_mm(rows, w.transpose(-2, -1), offs=a["ends"])
            return mm(swiglu(mm(a["compact"], a["w1"]), mm(a["compact"], a["w3"])), a["w2"])
        impls[GROUPED_MM] = (grouped_mm, ("compact",) + params)
    gmm = _megablocks_gmm() if peer_missing("megablocks", device) is None else None
    if gmm is not None:
        def megablocks(a):
            mm = lambda rows, w: gmm(rows, w, a["sizes"], trans_b=True)
            return mm(swiglu(mm(a["compact"], a["w1"]), mm(a["compact"], a["w3"])), a["w2"])
        impls[MEGABLOCKS] = (megablocks, ("compact",) + params)
    return impls


def time_forward_backward(forward, leaves, sets, device):
    """(forward ms, backward ms): the backward alone, replayed on each set's retained graph."""
    forward_ms = time_ms(forward, sets, device)
    graphs = []
    for a in sets:
        y = forward(a)
        graphs.append((y, [a[name] for name in leaves], torch.randn_like(y)))
    backward_ms = time_ms(lambda g: torch.autograd.grad(g[0], g[1], g[2], retain_graph=True),
                          graphs, device)
    return forward_ms, backward_ms


def bench_expert_mlp(device: torch.device, quick: bool) -> list[Row]:
    if device.type == "cuda":
        num_tokens, hidden, ffn, dtype = (1024 if quick else 4096), 4096, 14336, torch.bfloat16
    else:
        num_tokens, hidden, ffn, dtype = (128 if quick else 512), 128, 352, torch.float32
    pairs = num_tokens * TOP_K
    shape = f"T={num_tokens} E={NUM_EXPERTS} k={TOP_K} H={hidden} F={ffn}"
    dtype_name = str(dtype).removeprefix("torch.")
    flops = swiglu_mlp_flops(pairs, hidden, ffn)  # forward; the backward is twice that
    gen = torch.Generator().manual_seed(0)
    weights = {name: (torch.randn(NUM_EXPERTS, *dims, generator=gen) / dims[1] ** 0.5).to(dtype)
               .to(device).requires_grad_(True)
               for name, dims in (("w1", (ffn, hidden)), ("w3", (ffn, hidden)),
                                  ("w2", (hidden, ffn)))}
    weights["router"] = (torch.randn(NUM_EXPERTS, hidden, generator=gen) / hidden ** 0.5).to(
        dtype).to(device).requires_grad_(True)
    sets = [mlp_inputs(num_tokens, hidden, weights, device, seed) for seed in range(INPUT_SETS)]

    # The ceiling: one dense GEMM of the forward's FLOPs ([T*k, H] @ [H, 3F]); its backward is two.
    dense_w = torch.randn(hidden, 3 * ffn, generator=gen).to(dtype).to(device).requires_grad_(True)
    dense = lambda a: a["compact"] @ dense_w
    for a in sets:
        a["dense_w"] = dense_w
    dense_fwd, dense_bwd = time_forward_backward(dense, ("compact", "dense_w"), sets, device)
    ceilings = (flops / dense_fwd / 1e9, 2 * flops / dense_bwd / 1e9)
    rows = []

    def add(op, name, forward_ms, backward_ms):
        rows.append(compute_row(f"{op} fwd", shape, dtype_name, name, forward_ms, flops,
                                ceilings[0]))
        rows.append(compute_row(f"{op} bwd", shape, dtype_name, name, backward_ms, 2 * flops,
                                ceilings[1]))

    add("moe_expert_mlp", DENSE, dense_fwd, dense_bwd)
    for name, (forward, leaves) in mlp_implementations(device, dtype).items():
        add("moe_expert_mlp", name if name != "reference" else LOOP,
            *time_forward_backward(forward, leaves, sets, device))

    # The whole layer (router, gating, routing, permutations, experts) against the Hugging Face way.
    layer = MoEMLP(hidden, ffn, NUM_EXPERTS, TOP_K, block_size=BLOCK_SIZE, device=device,
                   dtype=dtype)
    with torch.no_grad():
        for name in ("w1", "w3", "w2"):
            getattr(layer, name).copy_(weights[name])
        layer.router.weight.copy_(weights["router"])
    add("moe_layer", LAYER, *time_forward_backward(lambda a: layer(a["x"])[0], ("x",), sets,
                                                   device))
    add("moe_layer", LOOP, *time_forward_backward(
        lambda a: eager_moe_layer(a["x"], a["router"], a["w1"], a["w3"], a["w2"]),
        ("x", "router", "w1", "w3", "w2"), sets, device))
    return rows


def bench_all(device: torch.device, quick: bool, ceiling_gbps: float | None) -> list[Row]:
    return bench_moe(device, quick, ceiling_gbps) + bench_expert_mlp(device, quick)


def run(device: torch.device, quick: bool, results_dir: str = RESULTS_DIR) -> list[Row]:
    return run_family("moe", device, quick, bench_all,
                      ("cpp", "triton", "triton (recompute)", "reference", LAYER),
                      (EAGER, LOOP, GROUPED_MM, MEGABLOCKS, DENSE), results_dir=results_dir)
