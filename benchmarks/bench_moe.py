"""Benchmarks of kernel family 3 (MoE): gating, the routing plan, permute and unpermute against a
PyTorch eager baseline (softmax + topk, and a torch.sort-based permutation), in GB/s next to the
measured copy bandwidth; and the expert MLP and the whole MoEMLP layer, forward and backward, in
TFLOP/s of useful FLOPs (3 GEMMs of 2*T*k*H*F forward, twice that backward): the expert MLP against
the reference (a loop over experts), torch._grouped_mm (bf16 on sm90+, where this torch has it),
megablocks' grouped GEMM when importable, and a dense GEMM of the same FLOPs (the ceiling); the
layer against transformers' own MixtralSparseMoeBlock when installed, with each of its experts
implementations that matter: the eager loop over experts and grouped_mm (from_pretrained's pick).

    python -m benchmarks --family moe [--quick]

On the CPU: routing at T=4096 tokens, E=8 experts, k=2, H=256 in float32; the MLP at T=512, H=128,
F=352 (the Triton interpreter is not timed). On a GPU: Mixtral-8x7B sizes, routing at T=8192 (2048
with --quick), H=4096 in float32 and bfloat16; the MLP and the layer at T=4096 (1024), H=4096,
F=14336, E=8, k=2 in bfloat16.
"""
from __future__ import annotations

import torch

from benchmarks import transformers_baselines
from benchmarks.counts import swiglu_mlp_flops
from benchmarks.harness import RESULTS_DIR, backends_to_time, bandwidth_rows, run_family, time_ms
from benchmarks.peers import peer_missing
from benchmarks.rows import Row, bandwidth_row, compute_row
from sphinx_kernels.dtypes import dtype_name
from sphinx_kernels.nn import MoEMLP
from sphinx_kernels.ops.moe_expert_mlp import MOE_EXPERT_MLP_BACKENDS, moe_expert_mlp
from sphinx_kernels.ops.moe_permute import MOE_PERMUTE_BACKENDS, moe_permute
from sphinx_kernels.ops.moe_routing import MOE_ROUTING_BACKENDS, moe_routing
from sphinx_kernels.ops.moe_unpermute import MOE_UNPERMUTE_BACKENDS, moe_unpermute
from sphinx_kernels.ops.topk_gating import TOPK_GATING_BACKENDS, topk_gating

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


def routing_case(device: torch.device, quick: bool):
    """(shape label, input sets per dtype) of the gating, routing and permutation benchmarks."""
    if device.type == "cuda":
        num_tokens, hidden = (2048 if quick else 8192), 4096
        dtypes = (torch.float32, torch.bfloat16)
    else:
        num_tokens, hidden, dtypes = (1024 if quick else 4096), 256, (torch.float32,)
    shape = f"T={num_tokens} E={NUM_EXPERTS} k={TOP_K} H={hidden}"
    return shape, {dtype: [moe_inputs(num_tokens, hidden, dtype, device, seed)
                           for seed in range(INPUT_SETS)] for dtype in dtypes}


def time_against_eager(op: str, registry, device, request_dtype, sets, shape, moved, ceiling_gbps,
                       run_op, run_eager) -> list[Row]:
    """Rows of ``run_op(inputs, backend)`` on every backend that serves here and of
    ``run_eager(inputs)``, in GB/s of the ``moved`` bytes."""
    dtype = sets[0]["x"].dtype
    rows = bandwidth_rows(op, registry, run_op, sets, device, dtype, shape, moved, ceiling_gbps,
                          request_dtype=request_dtype)
    ms = time_ms(run_eager, sets, device)
    return rows + [bandwidth_row(op, shape, dtype_name(dtype), EAGER, ms, moved, ceiling_gbps)]


def bench_topk_gating(device: torch.device, quick: bool, ceiling_gbps: float | None) -> list[Row]:
    shape, cases = routing_case(device, quick)
    rows = []
    for dtype, sets in cases.items():
        num_tokens = sets[0]["x"].shape[0]
        # Reads the logits, writes k (gate, id) pairs per token.
        moved = num_tokens * NUM_EXPERTS * sets[0]["x"].element_size() + num_tokens * TOP_K * 8
        rows += time_against_eager("topk_gating", TOPK_GATING_BACKENDS, device, dtype, sets, shape,
                                   moved, ceiling_gbps,
                                   lambda a, b: topk_gating(a["logits"], TOP_K, backend=b),
                                   lambda a: eager_gating(a["logits"]))
    return rows


def bench_moe_routing(device: torch.device, quick: bool, ceiling_gbps: float | None) -> list[Row]:
    shape, cases = routing_case(device, quick)
    rows = []
    for sets in cases.values():
        # Reads the ids, writes a position per pair and a pair per grouped row.
        moved = sets[0]["x"].shape[0] * TOP_K * 8 + sets[0]["plan"].num_padded_rows * 4
        rows += time_against_eager(
            "moe_routing", MOE_ROUTING_BACKENDS, device, torch.int32, sets, shape, moved,
            ceiling_gbps,
            lambda a, b: moe_routing(a["expert_ids"], NUM_EXPERTS, block_size=BLOCK_SIZE,
                                     backend=b),
            lambda a: eager_routing(a["expert_ids"]))
    return rows


def bench_moe_permute(device: torch.device, quick: bool, ceiling_gbps: float | None) -> list[Row]:
    shape, cases = routing_case(device, quick)
    rows = []
    for dtype, sets in cases.items():
        # Reads each token once and writes its k rows.
        num_tokens, hidden = sets[0]["x"].shape
        moved = (num_tokens + num_tokens * TOP_K) * hidden * sets[0]["x"].element_size()
        rows += time_against_eager("moe_permute", MOE_PERMUTE_BACKENDS, device, dtype, sets, shape,
                                   moved, ceiling_gbps,
                                   lambda a, b: moe_permute(a["x"], a["plan"], backend=b),
                                   lambda a: eager_permute(a["x"], a["order"]))
    return rows


def bench_moe_unpermute(device: torch.device, quick: bool,
                        ceiling_gbps: float | None) -> list[Row]:
    shape, cases = routing_case(device, quick)
    rows = []
    for dtype, sets in cases.items():
        # Reads the k rows of each token and writes the token.
        num_tokens, hidden = sets[0]["x"].shape
        moved = (num_tokens + num_tokens * TOP_K) * hidden * sets[0]["x"].element_size()
        rows += time_against_eager(
            "moe_unpermute", MOE_UNPERMUTE_BACKENDS, device, dtype, sets, shape, moved,
            ceiling_gbps,
            lambda a, b: moe_unpermute(a["grouped"], a["plan"], a["weights"], backend=b),
            lambda a: eager_unpermute(a["sorted"], a["inverse"], a["weights"]))
    return rows


# ----------------------------------------------------------------------------------------------
# The expert MLP and the whole layer, in TFLOP/s

GROUPED_MM = "torch._grouped_mm"
MEGABLOCKS = "megablocks gmm"
DENSE = "dense GEMM (ceiling)"
LAYER = "sphinx MoEMLP"
HF_BLOCK = "transformers MixtralSparseMoeBlock"
HF_BLOCK_GROUPED = "transformers MixtralSparseMoeBlock (grouped_mm)"


def swiglu(h1, h3):
    return torch.nn.functional.silu(h1) * h3


def _megablocks_gmm():
    """megablocks' grouped GEMM, ``gmm(a, b, batch_sizes, trans_b)``, or None when it is not
    usable."""
    from megablocks import grouped_gemm_util
    return grouped_gemm_util.ops.gmm if grouped_gemm_util.grouped_gemm_is_available() else None


def mlp_inputs(num_tokens, hidden, weights, device, seed):
    """One input set for the expert MLP: the block-padded grouped rows (ours), the same rows
    compacted in expert order with their group ends (grouped_mm, megablocks), the tokens
    (layers)."""
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
            def mm(rows, w):
                return torch._grouped_mm(rows, w.transpose(-2, -1), offs=a["ends"])
            return mm(swiglu(mm(a["compact"], a["w1"]), mm(a["compact"], a["w3"])), a["w2"])
        impls[GROUPED_MM] = (grouped_mm, ("compact",) + params)
    gmm = _megablocks_gmm() if peer_missing("megablocks", device) is None else None
    if gmm is not None:
        def megablocks(a):
            def mm(rows, w):
                return gmm(rows, w, a["sizes"], trans_b=True)
            return mm(swiglu(mm(a["compact"], a["w1"]), mm(a["compact"], a["w3"])), a["w2"])
        impls[MEGABLOCKS] = (megablocks, ("compact",) + params)
    return impls


def mlp_case(device: torch.device, quick: bool):
    """(tokens, hidden, ffn, dtype) of the expert-MLP and layer benchmarks."""
    if device.type == "cuda":
        return (1024 if quick else 4096), 4096, 14336, torch.bfloat16
    return (128 if quick else 512), 128, 352, torch.float32


def mlp_weights(hidden, ffn, dtype, device):
    """Expert weights ``w1``, ``w3`` ``[E, F, H]``, ``w2`` ``[E, H, F]`` and the router
    ``[E, H]``."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"w1": (NUM_EXPERTS, ffn, hidden), "w3": (NUM_EXPERTS, ffn, hidden),
              "w2": (NUM_EXPERTS, hidden, ffn), "router": (NUM_EXPERTS, hidden)}
    return {name: (torch.randn(shape, generator=gen) / shape[-1] ** 0.5).to(dtype).to(device)
            .requires_grad_(True) for name, shape in shapes.items()}


def time_forward_backward(forward, leaves, sets, device):
    """(forward ms, backward ms): the backward alone, to ``leaves(inputs)``, replayed on each set's
    retained graph."""
    forward_ms = time_ms(forward, sets, device)
    graphs = []
    for a in sets:
        y = forward(a)
        graphs.append((y, leaves(a), torch.randn_like(y)))
    backward_ms = time_ms(lambda g: torch.autograd.grad(g[0], g[1], g[2], retain_graph=True),
                          graphs, device)
    return forward_ms, backward_ms


def mlp_rows(op, name, shape, dtype, flops, timings, ceilings=(None, None)) -> list[Row]:
    """The forward and backward rows of one implementation (the backward counts twice the FLOPs)."""
    name_of_dtype = dtype_name(dtype)
    return [compute_row(f"{op} fwd", shape, name_of_dtype, name, timings[0], flops, ceilings[0]),
            compute_row(f"{op} bwd", shape, name_of_dtype, name, timings[1], 2 * flops,
                        ceilings[1])]


def bench_moe_expert_mlp(device: torch.device, quick: bool,
                         ceiling_gbps: float | None = None) -> list[Row]:
    """Every expert's SwiGLU MLP, forward and backward, against a dense GEMM of the same FLOPs (the
    ceiling of these compute-bound rows: ``ceiling_gbps`` is not used)."""
    num_tokens, hidden, ffn, dtype = mlp_case(device, quick)
    shape = f"T={num_tokens} E={NUM_EXPERTS} k={TOP_K} H={hidden} F={ffn}"
    flops = swiglu_mlp_flops(num_tokens * TOP_K, hidden, ffn)  # forward; the backward is twice that
    weights = mlp_weights(hidden, ffn, dtype, device)
    sets = [mlp_inputs(num_tokens, hidden, weights, device, seed) for seed in range(INPUT_SETS)]
    # The ceiling: one dense GEMM of the forward's FLOPs ([T*k, H] @ [H, 3F]); its backward is two.
    dense_w = torch.randn(hidden, 3 * ffn, generator=torch.Generator().manual_seed(1)).to(
        dtype).to(device).requires_grad_(True)
    dense = time_forward_backward(lambda a: a["compact"] @ dense_w,
                                  lambda a: [a["compact"], dense_w], sets, device)
    ceilings = (flops / dense[0] / 1e9, 2 * flops / dense[1] / 1e9)
    rows = mlp_rows("moe_expert_mlp", DENSE, shape, dtype, flops, dense, ceilings)
    for name, (forward, leaves) in mlp_implementations(device, dtype).items():
        timings = time_forward_backward(forward, lambda a, n=leaves: [a[k] for k in n], sets,
                                        device)
        rows += mlp_rows("moe_expert_mlp", name, shape, dtype, flops, timings, ceilings)
    return rows


def bench_moe_mlp(device: torch.device, quick: bool,
                  ceiling_gbps: float | None = None) -> list[Row]:
    """The whole layer (router, gating, routing, permutations, experts) against transformers' own
    Mixtral block, both differentiated to the tokens and every weight (compute-bound rows:
    ``ceiling_gbps`` is not used)."""
    num_tokens, hidden, ffn, dtype = mlp_case(device, quick)
    shape = f"T={num_tokens} E={NUM_EXPERTS} k={TOP_K} H={hidden} F={ffn}"
    flops = swiglu_mlp_flops(num_tokens * TOP_K, hidden, ffn)
    weights = mlp_weights(hidden, ffn, dtype, device)
    sets = [mlp_inputs(num_tokens, hidden, weights, device, seed) for seed in range(INPUT_SETS)]
    layer = MoEMLP(hidden, ffn, NUM_EXPERTS, TOP_K, block_size=BLOCK_SIZE, device=device,
                   dtype=dtype)
    with torch.no_grad():
        for name in ("w1", "w3", "w2"):
            getattr(layer, name).copy_(weights[name])
        layer.router.weight.copy_(weights["router"])
    rows = mlp_rows("moe_layer", LAYER, shape, dtype, flops, time_forward_backward(
        lambda a: layer(a["x"])[0], lambda a: [a["x"], *layer.parameters()], sets, device))
    if peer_missing("transformers", device) is None:  # else listed with its reason
        # Both of transformers' experts: the eager loop a standalone block runs, and grouped_mm,
        # which from_pretrained picks where torch has it (what a user loading Mixtral gets).
        for name, experts in ((HF_BLOCK, "eager"), (HF_BLOCK_GROUPED, "grouped_mm")):
            block = transformers_baselines.mixtral_moe_block(
                weights["router"].detach(), *(weights[n].detach() for n in ("w1", "w3", "w2")),
                TOP_K, experts_implementation=experts)
            rows += mlp_rows("moe_layer", name, shape, dtype, flops, time_forward_backward(
                lambda a, b=block: transformers_baselines.moe_block_output(b, a["x"]),
                lambda a, b=block: [a["x"], *b.parameters()], sets, device))
    return rows


BENCHMARKS = (bench_topk_gating, bench_moe_routing, bench_moe_permute, bench_moe_unpermute,
              bench_moe_expert_mlp, bench_moe_mlp)


def run(device: torch.device, quick: bool, results_dir: str = RESULTS_DIR) -> list[Row]:
    return run_family("moe", device, quick, BENCHMARKS,
                      ("cpp", "triton", "triton (recompute)", LAYER),
                      (EAGER, "reference", GROUPED_MM, MEGABLOCKS, DENSE, HF_BLOCK,
                       HF_BLOCK_GROUPED),
                      results_dir=results_dir)
