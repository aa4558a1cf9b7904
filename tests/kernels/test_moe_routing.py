"""MoE routing on every backend this machine can run: top-k gating and its losses against a float64
reference within DESIGN.md's tolerance, routing-plan invariants, exact permutation, the weighted
unpermute and every gradient, bad inputs, opcheck and torch.compile of the whole routing chain."""
from __future__ import annotations

import re

import pytest
import torch

import sphinx_kernels
from sphinx_kernels.moe import (MOE_PERMUTE_BACKENDS, MOE_ROUTING_BACKENDS, TOPK_GATING_BACKENDS,
                                padded_rows_bound, topk_gating_reference)
from tests.numerics import FORWARD_FACTOR, GRADIENT_FACTOR, assert_within_torch_error

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The interpreter's bf16 arithmetic is wrong (ENVIRONMENT.md): bf16 is checked by the GPU tests.
DTYPES = [torch.float32, torch.float16]
BACKENDS = TOPK_GATING_BACKENDS.available(TOPK_GATING_BACKENDS.request(DEVICE, torch.float32))
# moe_routing has compiled backends too (cpp on the CPU, cuda on a GPU), moe_permute/unpermute cpp.
ROUTING_BACKENDS = MOE_ROUTING_BACKENDS.available(MOE_ROUTING_BACKENDS.request(DEVICE, torch.int32))
PERMUTE_BACKENDS = MOE_PERMUTE_BACKENDS.available(MOE_PERMUTE_BACKENDS.request(DEVICE, torch.float32))
# (T, E, k): empty, a single token and expert, odd sizes, more slots than half the experts.
CASES = [(0, 8, 2), (1, 1, 1), (7, 2, 1), (97, 8, 4), (300, 8, 2)]


def generator(seed=None):
    return torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)


def random_logits(num_tokens, num_experts, dtype, gen, requires_grad=False):
    logits = torch.randn(num_tokens, num_experts, generator=gen, dtype=torch.float64) * 2
    return logits.to(dtype).to(DEVICE).requires_grad_(requires_grad)


def random_expert_ids(num_tokens, num_experts, k, gen, skew=False):
    """Distinct experts per token, like top-k; ``skew`` leaves the upper half of experts idle."""
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    if skew:
        scores[:, num_experts // 2:] -= 2  # never among the top k while k <= E // 2
    return scores.topk(k, dim=1).indices.int().to(DEVICE)


def make_plan(num_tokens, num_experts, k, block_size, gen, backend="reference", skew=False):
    expert_ids = random_expert_ids(num_tokens, num_experts, k, gen, skew)
    return sphinx_kernels.moe_routing(expert_ids, num_experts, block_size=block_size,
                                      backend=backend)


# ---------------------------------------------------------------------------------------------------
# topk_gating


def gating_outputs(gating):
    """The float outputs, for comparison: weights and the two losses."""
    return {"weights": gating.weights, "load_balancing_loss": gating.load_balancing_loss,
            "z_loss": gating.z_loss}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,num_experts,k", CASES)
@pytest.mark.parametrize("renormalize", [True, False])
def test_gating_forward_within_tolerance_of_float64(backend, dtype, num_tokens, num_experts, k,
                                                    renormalize):
    logits = random_logits(num_tokens, num_experts, dtype, generator())
    got = sphinx_kernels.topk_gating(logits, k, renormalize=renormalize, backend=backend)
    expected = topk_gating_reference(logits.double(), k, renormalize)
    same_dtype = topk_gating_reference(logits, k, renormalize)
    assert got.weights.dtype == torch.float32 and got.expert_ids.dtype == torch.int32
    assert torch.equal(got.expert_ids, expected.expert_ids)
    assert torch.equal(got.tokens_per_expert, expected.tokens_per_expert)
    assert int(got.tokens_per_expert.sum()) == num_tokens * k
    for name, value in gating_outputs(got).items():
        assert_within_torch_error(value, gating_outputs(expected)[name],
                                  gating_outputs(same_dtype)[name], FORWARD_FACTOR,
                                  f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gating_ties_go_to_the_lower_expert_id(backend):
    """Integer logits from {0, 1, 2}: equal logits give bit-equal probabilities, so many ties."""
    gen = generator()
    logits = torch.randint(0, 3, (64, 8), generator=gen).float().to(DEVICE)
    got = sphinx_kernels.topk_gating(logits, 4, backend=backend)
    for t, row in enumerate(logits.tolist()):
        expected = sorted(range(8), key=lambda e: (-row[e], e))[:4]
        assert got.expert_ids[t].tolist() == expected


def gating_gradient(logits, k, renormalize, grads, run):
    """d/d(logits) of weights . grads[0] + grads[1] * load_balancing_loss + grads[2] * z_loss."""
    logits = logits.detach().requires_grad_(True)
    out = run(logits, k, renormalize)
    loss = (out.weights * grads[0].to(out.weights.dtype)).sum()
    loss = loss + grads[1] * out.load_balancing_loss + grads[2] * out.z_loss
    (grad,) = torch.autograd.grad(loss, logits)
    return grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,num_experts,k", CASES[1:])
@pytest.mark.parametrize("renormalize", [True, False])
def test_gating_gradient_within_tolerance_of_float64(backend, dtype, num_tokens, num_experts, k,
                                                     renormalize):
    gen = generator()
    logits = random_logits(num_tokens, num_experts, dtype, gen)
    grads = (torch.randn(num_tokens, k, generator=gen, dtype=torch.float64).to(DEVICE), 0.7, 0.3)

    def kernel(x, k, renormalize):
        return sphinx_kernels.topk_gating(x, k, renormalize=renormalize, backend=backend)

    got = gating_gradient(logits, k, renormalize, grads, kernel)
    expected = gating_gradient(logits.double(), k, renormalize, grads, topk_gating_reference)
    same_dtype = gating_gradient(logits, k, renormalize, grads, topk_gating_reference)
    assert got.dtype == dtype
    assert_within_torch_error(got, expected, same_dtype, GRADIENT_FACTOR, f"{backend} grad",
                              baseline_floor=torch_gating_gradient_error(num_experts, k,
                                                                         renormalize, dtype))


def torch_gating_gradient_error(num_experts, k, renormalize, dtype, num_tokens=512):
    """PyTorch's own error on the gating gradient over many tokens: a handful of tokens has too few
    values (14 for T = 7, E = 2) for their maximum error to measure it, and a lucky draw left PyTorch
    within one ulp where an exact-to-3-ulp kernel then failed."""
    gen = generator()
    logits = random_logits(num_tokens, num_experts, dtype, gen)
    grads = (torch.randn(num_tokens, k, generator=gen, dtype=torch.float64).to(DEVICE), 0.7, 0.3)
    expected = gating_gradient(logits.double(), k, renormalize, grads, topk_gating_reference)
    same_dtype = gating_gradient(logits, k, renormalize, grads, topk_gating_reference)
    return float((same_dtype.double() - expected).abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_gating_gradient_of_one_loss_alone(backend):
    """Outputs left out of the loss contribute nothing (their gradients arrive as None)."""
    logits = random_logits(33, 8, torch.float32, generator(), requires_grad=True)
    sphinx_kernels.topk_gating(logits, 2, backend=backend).z_loss.backward()
    x = logits.detach().double().requires_grad_(True)
    topk_gating_reference(x, 2).z_loss.backward()
    same_dtype = logits.detach().requires_grad_(True)
    topk_gating_reference(same_dtype, 2).z_loss.backward()
    assert_within_torch_error(logits.grad, x.grad, same_dtype.grad, GRADIENT_FACTOR, backend)


# ---------------------------------------------------------------------------------------------------
# moe_routing


def assert_plan_invariants(plan, expert_ids, num_experts, block_size):
    """Every definition of the plan, checked pair by pair against the expert ids."""
    num_tokens, k = expert_ids.shape
    flat = expert_ids.reshape(-1).tolist()
    counts = [flat.count(e) for e in range(num_experts)]
    assert plan.tokens_per_expert.tolist() == counts
    offsets = plan.padded_offsets.tolist()
    assert offsets[0] == 0 and len(offsets) == num_experts + 1
    for e in range(num_experts):
        size = offsets[e + 1] - offsets[e]
        assert size % block_size == 0 and counts[e] <= size < counts[e] + block_size
    assert plan.num_padded_rows == padded_rows_bound(num_tokens * k, num_experts, block_size)
    assert offsets[-1] <= plan.num_padded_rows
    # Stable: the pairs of expert e, in (token, slot) order, fill its segment from the start.
    position = plan.position.reshape(-1).tolist()
    expected_rows = [-1] * plan.num_padded_rows
    seen = [0] * num_experts
    for pair, e in enumerate(flat):
        assert position[pair] == offsets[e] + seen[e]
        expected_rows[offsets[e] + seen[e]] = pair
        seen[e] += 1
    assert plan.row_to_pair.tolist() == expected_rows  # every pair placed exactly once


@pytest.mark.parametrize("backend", ROUTING_BACKENDS)
@pytest.mark.parametrize("num_tokens,num_experts,k", CASES + [(300, 1, 1), (7, 2, 2)])
@pytest.mark.parametrize("block_size", [1, 16, 128])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_routing_plan_invariants(backend, num_tokens, num_experts, k, block_size, index_dtype):
    gen = generator()
    expert_ids = random_expert_ids(num_tokens, num_experts, k, gen, skew=2 * k <= num_experts)
    plan = sphinx_kernels.moe_routing(expert_ids.to(index_dtype), num_experts,
                                      block_size=block_size, backend=backend)
    assert all(t.dtype == torch.int32 for t in plan)
    assert_plan_invariants(plan, expert_ids, num_experts, block_size)
    reference = sphinx_kernels.moe_routing(expert_ids, num_experts, block_size=block_size,
                                           backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(plan, reference))  # the same plan, bit for bit


@pytest.mark.parametrize("backend", ROUTING_BACKENDS)
def test_routing_all_tokens_to_one_expert(backend):
    expert_ids = torch.full((300, 1), 5, dtype=torch.int32, device=DEVICE)
    plan = sphinx_kernels.moe_routing(expert_ids, 8, block_size=64, backend=backend)
    assert plan.tokens_per_expert.tolist() == [0] * 5 + [300, 0, 0]
    assert plan.padded_offsets.tolist() == [0] * 6 + [320] * 3
    assert_plan_invariants(plan, expert_ids, 8, 64)


@pytest.mark.parametrize("backend", [b for b in ROUTING_BACKENDS if b != "reference"])
def test_routing_kernel_places_an_unchecked_bad_id_nowhere(backend):
    """Kernels stay in bounds on ids that reach them unchecked (a GPU without value checks)."""
    expert_ids = torch.tensor([[0, 1], [7, 1], [-1, 0]], dtype=torch.int32, device=DEVICE)
    tokens_per_expert, _, position, row_to_pair = torch.ops.sphinx_kernels.moe_routing(expert_ids, 2, 4, backend)
    assert tokens_per_expert.tolist() == [2, 2]
    assert position[1, 0] == -1 and position[2, 0] == -1
    assert sorted(row_to_pair[row_to_pair >= 0].tolist()) == [0, 1, 3, 5]


# ---------------------------------------------------------------------------------------------------
# moe_permute / moe_unpermute


def loop_permute(x, plan):
    """The definition, one row at a time."""
    out = torch.zeros(plan.num_padded_rows, x.shape[1], dtype=x.dtype, device=x.device)
    for t, rows in enumerate(plan.position.tolist()):
        for row in rows:
            out[row] = x[t]
    return out


PERMUTE_CASES = [(0, 8, 2, 4), (1, 1, 1, 16), (7, 2, 2, 4), (97, 8, 4, 16), (300, 8, 2, 128)]


@pytest.mark.parametrize("backend", PERMUTE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16])
@pytest.mark.parametrize("num_tokens,num_experts,k,block_size", PERMUTE_CASES)
def test_permute_is_exact(backend, dtype, num_tokens, num_experts, k, block_size):
    gen = generator()
    plan = make_plan(num_tokens, num_experts, k, block_size, gen, skew=2 * k <= num_experts)
    x = torch.randn(num_tokens, 33, generator=gen).to(dtype).to(DEVICE)
    out = sphinx_kernels.moe_permute(x, plan, backend=backend)
    assert out.dtype == dtype
    assert torch.equal(out, loop_permute(x, plan))


def torch_unpermute(y_grouped, plan, weights):
    """The definition in PyTorch, in the inputs' dtype (float64 inputs: the oracle)."""
    rows = y_grouped[plan.position.long()]  # [T, k, H]
    return (rows * weights.to(rows.dtype)[:, :, None]).sum(1)


@pytest.mark.parametrize("backend", PERMUTE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,num_experts,k,block_size", PERMUTE_CASES)
def test_unpermute_and_gradients_within_tolerance_of_float64(backend, dtype, num_tokens,
                                                             num_experts, k, block_size):
    gen = generator()
    plan = make_plan(num_tokens, num_experts, k, block_size, gen)
    y_grouped = torch.randn(plan.num_padded_rows, 40, generator=gen).to(dtype).to(DEVICE)
    weights = torch.rand(num_tokens, k, generator=gen).to(DEVICE)
    grad_out = torch.randn(num_tokens, 40, generator=gen).to(dtype).to(DEVICE)

    def run(y, w, unpermute):
        y, w = y.detach().requires_grad_(True), w.detach().requires_grad_(True)
        out = unpermute(y, plan, w)
        out.backward(grad_out.to(out.dtype))
        return out.detach(), y.grad, w.grad

    got = run(y_grouped, weights,
              lambda y, p, w: sphinx_kernels.moe_unpermute(y, p, w, backend=backend))
    expected = run(y_grouped.double(), weights.double(), torch_unpermute)
    same_dtype = run(y_grouped, weights, torch_unpermute)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == torch.float32
    padding = plan.row_to_pair < 0
    assert torch.equal(got[1][padding], torch.zeros_like(got[1][padding]))
    assert_within_torch_error(got[0], expected[0], same_dtype[0], FORWARD_FACTOR, f"{backend} out")
    assert_within_torch_error(got[1], expected[1], same_dtype[1], GRADIENT_FACTOR,
                              f"{backend} grad y_grouped")
    if num_tokens * k >= 64:
        assert_within_torch_error(got[2], expected[2], same_dtype[2], GRADIENT_FACTOR,
                                  f"{backend} grad weights")
    else:
        # Too few dot products for PyTorch's max error to measure anything (a single one is often
        # exact by luck): hold them to the worst-case bound of a float32 dot product of n terms
        # (products of float16 inputs are exact in float32), n u / (1 - n u) * sum |terms|.
        terms = y_grouped.double()[plan.position.long()] * grad_out.double()[:, None, :]
        n, u = terms.shape[-1] + 1, torch.finfo(torch.float32).eps / 2
        bound = n * u / (1 - n * u) * terms.abs().sum(-1)
        assert ((got[2].double() - expected[2]).abs() <= bound).all(), f"{backend} grad weights"


@pytest.mark.parametrize("backend", PERMUTE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_permute_gradient_sums_the_token_rows(backend, dtype):
    gen = generator()
    plan = make_plan(97, 8, 4, 16, gen)
    x = torch.randn(97, 24, generator=gen).to(dtype).to(DEVICE).requires_grad_(True)
    grad_out = torch.randn(plan.num_padded_rows, 24, generator=gen).to(dtype).to(DEVICE)
    sphinx_kernels.moe_permute(x, plan, backend=backend).backward(grad_out)
    rows = plan.position.long()
    expected = grad_out.double()[rows].sum(1)
    same_dtype = grad_out[rows].sum(1)
    assert_within_torch_error(x.grad, expected, same_dtype, GRADIENT_FACTOR, backend)


def test_unpermute_without_weights_undoes_permute():
    gen = generator()
    plan = make_plan(97, 8, 2, 16, gen)
    x = torch.randint(-8, 8, (97, 16), generator=gen).float().to(DEVICE)  # sums exact in fp32
    for backend in PERMUTE_BACKENDS:
        grouped = sphinx_kernels.moe_permute(x, plan, backend=backend)
        assert torch.equal(sphinx_kernels.moe_unpermute(grouped, plan, None, backend=backend), 2 * x)


def test_kernel_backends_agree_bitwise_and_are_deterministic():
    gen = generator()
    logits = random_logits(300, 8, torch.float32, gen)
    plan = make_plan(300, 8, 2, 16, gen)
    y_grouped = torch.randn(plan.num_padded_rows, 40, generator=gen).to(DEVICE)
    weights = torch.rand(300, 2, generator=gen).to(DEVICE)
    results = {}
    for backend in BACKENDS:
        first, again = ((sphinx_kernels.topk_gating(logits, 2, backend=backend).expert_ids,
                         sphinx_kernels.moe_unpermute(y_grouped, plan, weights, backend=backend))
                        for _ in "12")
        assert all(torch.equal(a, b) for a, b in zip(first, again)), backend
        results[backend] = first
    baseline = next(iter(results.values()))
    for backend, result in results.items():
        assert all(torch.equal(a, b) for a, b in zip(result, baseline)), backend
    # Every unpermute kernel sums in float32 in slot order, one multiply then one add per slot.
    for backend in PERMUTE_BACKENDS:
        out = sphinx_kernels.moe_unpermute(y_grouped, plan, weights, backend=backend)
        assert torch.equal(out, baseline[1]), backend


# ---------------------------------------------------------------------------------------------------
# Bad input


def bad_call(op, **changes):
    """One call of ``op`` on valid CPU inputs (where index values are checked too), with ``changes``
    applied."""
    logits = torch.randn(6, 4)
    expert_ids = torch.tensor([[0, 1], [3, 2], [1, 0]], dtype=torch.int32)
    plan = sphinx_kernels.moe_routing(expert_ids, 4, block_size=4)
    args = {"logits": logits, "k": 2, "expert_ids": expert_ids, "num_experts": 4, "block_size": 4,
            "x": torch.randn(3, 5), "plan": plan,
            "y_grouped": torch.randn(plan.num_padded_rows, 5),
            "weights": torch.rand(3, 2)}
    args.update({name: change(args) for name, change in changes.items()})
    calls = {
        "gating": lambda a: sphinx_kernels.topk_gating(a["logits"], a["k"]),
        "routing": lambda a: sphinx_kernels.moe_routing(a["expert_ids"], a["num_experts"],
                                                        block_size=a["block_size"]),
        "permute": lambda a: sphinx_kernels.moe_permute(a["x"], a["plan"]),
        "unpermute": lambda a: sphinx_kernels.moe_unpermute(a["y_grouped"], a["plan"], a["weights"]),
    }
    return calls[op](args)


BAD_INPUTS = [
    ("gating", {"logits": lambda a: a["logits"].long()}, TypeError, "logits must have dtype"),
    ("gating", {"logits": lambda a: a["logits"].double()}, TypeError, "logits must have dtype"),
    ("gating", {"logits": lambda a: a["logits"][None]}, ValueError, "logits must be 2-D"),
    ("gating", {"logits": lambda a: a["logits"][:, :0]}, ValueError, "logits must have at least"),
    ("gating", {"k": lambda a: 5}, ValueError, "k must be in [1, E] = [1, 4]"),
    ("gating", {"k": lambda a: 0}, ValueError, "k must be in [1, E] = [1, 4]"),
    ("gating", {"k": lambda a: 2.0}, TypeError, "k must be an int"),
    ("routing", {"expert_ids": lambda a: a["expert_ids"].float()}, TypeError,
     "expert_ids must have dtype"),
    ("routing", {"expert_ids": lambda a: a["expert_ids"][0]}, ValueError, "expert_ids must be 2-D"),
    ("routing", {"expert_ids": lambda a: a["expert_ids"][:, :0]}, ValueError, "k >= 1"),
    ("routing", {"expert_ids": lambda a: a["expert_ids"] + 2}, ValueError,
     "expert_ids must be in [0, num_experts) = [0, 4), got values in [2, 5]"),
    ("routing", {"expert_ids": lambda a: a["expert_ids"] - 1}, ValueError,
     "expert_ids must be in [0, num_experts)"),
    ("routing", {"num_experts": lambda a: 0}, ValueError, "num_experts must be >= 1"),
    ("routing", {"block_size": lambda a: 0}, ValueError, "block_size must be >= 1"),
    ("routing", {"block_size": lambda a: 2**30}, ValueError, "more than 2^31 grouped rows"),
    ("permute", {"x": lambda a: a["x"][:2]}, ValueError,
     "x has 2 rows but plan.position has 3"),
    ("permute", {"x": lambda a: a["x"].int()}, TypeError, "x must have dtype"),
    ("permute", {"plan": lambda a: tuple(a["plan"])}, TypeError, "plan must be a RoutingPlan"),
    ("permute", {"plan": lambda a: a["plan"]._replace(position=a["plan"].position.long())},
     TypeError, "plan.position must have dtype int32"),
    ("permute", {"plan": lambda a: a["plan"]._replace(position=a["plan"].position + 100)},
     ValueError, "plan.position must be in [0, R) = [0, 16)"),
    ("permute", {"plan": lambda a: a["plan"]._replace(row_to_pair=a["plan"].row_to_pair.to("meta"))},
     ValueError, "plan.row_to_pair is on meta"),
    ("unpermute", {"y_grouped": lambda a: a["y_grouped"][1:]}, ValueError,
     "y_grouped has 15 rows but plan.row_to_pair has 16"),
    ("unpermute", {"weights": lambda a: a["weights"][:, :1]}, ValueError, "weights has shape (3, 1)"),
    ("unpermute", {"weights": lambda a: a["weights"].int()}, TypeError, "weights must have dtype"),
    ("unpermute", {"weights": lambda a: a["weights"].to("meta")}, ValueError, "weights is on meta"),
]


@pytest.mark.parametrize("op,changes,error,message", BAD_INPUTS)
@pytest.mark.usefixtures("value_checks_on")
def test_bad_input_raises_naming_the_argument(op, changes, error, message):
    with pytest.raises(error, match=re.escape(message)):
        bad_call(op, **changes)


# ---------------------------------------------------------------------------------------------------
# opcheck and torch.compile


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    gen = generator(7)
    logits = random_logits(37, 8, torch.float32, gen, requires_grad=True)
    torch.library.opcheck(torch.ops.sphinx_kernels.topk_gating.default, (logits, 2, True, backend))
    gating = torch.ops.sphinx_kernels.topk_gating(logits.detach(), 2, True, backend)
    scalar = torch.tensor(0.5, device=DEVICE)
    torch.library.opcheck(torch.ops.sphinx_kernels.topk_gating_backward.default,
                          (logits.detach(), gating[1], gating[0], gating[4],
                           torch.randn(37, 2, device=DEVICE), scalar, scalar, True, backend))
    for routing_backend in ROUTING_BACKENDS:
        torch.library.opcheck(torch.ops.sphinx_kernels.moe_routing.default, (gating[1], 8, 16, routing_backend))
    plan = make_plan(37, 8, 2, 16, gen, backend)
    x = torch.randn(37, 9, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.sphinx_kernels.moe_permute.default, (x, plan.position, plan.row_to_pair, None, backend))
    y_grouped = torch.randn(plan.num_padded_rows, 9, device=DEVICE, requires_grad=True)
    weights = torch.rand(37, 2, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.sphinx_kernels.moe_unpermute.default,
                          (y_grouped, plan.position, plan.row_to_pair, weights, backend))
    torch.library.opcheck(torch.ops.sphinx_kernels.moe_pair_dots.default, (x.detach(), y_grouped.detach(), plan.position,
                                              torch.float32, backend))


@pytest.mark.parametrize("backend", [b for b in PERMUTE_BACKENDS if b not in BACKENDS])
def test_opcheck_of_permutations_only_backends(backend):
    gen = generator(8)
    plan = make_plan(37, 8, 2, 16, gen)
    x = torch.randn(37, 9, device=DEVICE, requires_grad=True)
    scale = torch.rand(37 * 2, device=DEVICE)
    for s in (None, scale):
        torch.library.opcheck(torch.ops.sphinx_kernels.moe_permute.default, (x, plan.position, plan.row_to_pair, s, backend))
    y_grouped = torch.randn(plan.num_padded_rows, 9, device=DEVICE, requires_grad=True)
    weights = torch.rand(37, 2, device=DEVICE, requires_grad=True)
    for w in (None, weights):
        torch.library.opcheck(torch.ops.sphinx_kernels.moe_unpermute.default,
                              (y_grouped, plan.position, plan.row_to_pair, w, backend))
    torch.library.opcheck(torch.ops.sphinx_kernels.moe_pair_dots.default, (x.detach(), y_grouped.detach(), plan.position,
                                              torch.float32, backend))


def moe_layer(x, router, expert_scale, backend):
    """Gating -> routing -> permute -> a stand-in expert (row scale by owning expert) -> unpermute."""
    gating = sphinx_kernels.topk_gating(x @ router, 2, backend=backend)
    plan = sphinx_kernels.moe_routing(gating.expert_ids, router.shape[1], block_size=16,
                                      backend=backend)
    grouped = sphinx_kernels.moe_permute(x, plan, backend=backend)
    row_expert = torch.searchsorted(plan.padded_offsets[1:],
                                    torch.arange(grouped.shape[0], device=x.device), right=True)
    expert_out = grouped * expert_scale[row_expert.clamp(max=router.shape[1] - 1)][:, None]
    out = sphinx_kernels.moe_unpermute(expert_out, plan, gating.weights, backend=backend)
    return out.square().sum() + gating.load_balancing_loss + 1e-3 * gating.z_loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_with_fullgraph_forward_and_backward(backend):
    gen = generator(11)
    inputs = [torch.randn(61, 16, generator=gen), torch.randn(16, 8, generator=gen),
              torch.rand(8, generator=gen)]
    eager_inputs = [t.to(DEVICE).requires_grad_(True) for t in inputs]
    compiled_inputs = [t.to(DEVICE).requires_grad_(True) for t in inputs]
    moe_layer(*eager_inputs, backend).backward()
    torch.compile(moe_layer, fullgraph=True)(*compiled_inputs, backend).backward()
    for eager, compiled in zip(eager_inputs, compiled_inputs):
        torch.testing.assert_close(compiled.grad, eager.grad, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# GPU: the Triton kernels at Mixtral-8x7B sizes (skipped without a GPU).

MIXTRAL = {"num_tokens": 8192, "num_experts": 8, "k": 2, "hidden": 4096}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_gating_at_mixtral_size(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = random_logits(MIXTRAL["num_tokens"], MIXTRAL["num_experts"], dtype, gen)
    grads = (torch.randn(MIXTRAL["num_tokens"], 2, generator=gen).cuda(), 0.01, 0.001)

    def kernel(x, k, renormalize):
        return sphinx_kernels.topk_gating(x, k, renormalize=renormalize, backend="triton")

    got = sphinx_kernels.topk_gating(logits, MIXTRAL["k"], backend="triton")
    expected = topk_gating_reference(logits.double(), MIXTRAL["k"])
    same_dtype = topk_gating_reference(logits, MIXTRAL["k"])
    assert torch.equal(got.expert_ids, expected.expert_ids)
    for name, value in gating_outputs(got).items():
        assert_within_torch_error(value, gating_outputs(expected)[name],
                                  gating_outputs(same_dtype)[name], FORWARD_FACTOR, name)
    assert_within_torch_error(gating_gradient(logits, 2, True, grads, kernel),
                              gating_gradient(logits.double(), 2, True, grads,
                                              topk_gating_reference),
                              gating_gradient(logits, 2, True, grads, topk_gating_reference),
                              GRADIENT_FACTOR, "grad")


@pytest.mark.gpu
def test_gpu_routing_and_permutation_at_mixtral_size():
    gen = torch.Generator().manual_seed(0)
    num_tokens, num_experts, k, hidden = MIXTRAL.values()
    expert_ids = random_expert_ids(num_tokens, num_experts, k, gen)
    reference = sphinx_kernels.moe_routing(expert_ids, num_experts, backend="reference")
    for backend in ("cuda", "triton"):
        plan = sphinx_kernels.moe_routing(expert_ids, num_experts, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(plan, reference)), backend
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16).cuda()
    grouped = sphinx_kernels.moe_permute(x, plan, backend="triton")
    assert torch.equal(grouped, sphinx_kernels.moe_permute(x, plan, backend="reference"))
    weights = torch.rand(num_tokens, k, generator=gen).cuda()
    out = sphinx_kernels.moe_unpermute(grouped, plan, weights, backend="triton")
    assert_within_torch_error(out, torch_unpermute(grouped.double(), plan, weights.double()),
                              torch_unpermute(grouped, plan, weights), FORWARD_FACTOR, "unpermute")
    request = MOE_ROUTING_BACKENDS.request(expert_ids.device, expert_ids.dtype,
                                           num_experts=num_experts)
    assert MOE_ROUTING_BACKENDS.select(request).name == "cuda"
