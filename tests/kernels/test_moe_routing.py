"""moe_routing on every backend this machine can run: every definition of the routing plan checked
pair by pair, the same plan bit for bit on every backend, all tokens to one expert, ids that reach a
kernel unchecked, the backend table's expert limit, bad inputs, opcheck."""
from __future__ import annotations

import re

import pytest
import torch

import sphinx_kernels
from sphinx_kernels.ops.moe_routing import (
    MAX_NATIVE_ROUTING_EXPERTS,
    MOE_ROUTING_BACKENDS,
    padded_rows_bound,
)
from tests.kernels.moe_cases import DEVICE, MIXTRAL, random_expert_ids

# moe_routing has compiled backends too: cpp on the CPU, cuda on a GPU.
ROUTING_BACKENDS = MOE_ROUTING_BACKENDS.available(MOE_ROUTING_BACKENDS.request(DEVICE, torch.int32))
# (T, E, k): empty, a single token and expert, odd sizes, more slots than half the experts, one
# expert for all, every expert for every token.
CASES = [(0, 8, 2), (1, 1, 1), (7, 2, 1), (97, 8, 4), (300, 8, 2), (300, 1, 1), (7, 2, 2)]


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
@pytest.mark.parametrize("num_tokens,num_experts,k", CASES)
@pytest.mark.parametrize("block_size", [1, 16, 128])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_plan_invariants(backend, num_tokens, num_experts, k, block_size, index_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    expert_ids = random_expert_ids(num_tokens, num_experts, k, gen, skew=2 * k <= num_experts)
    plan = sphinx_kernels.moe_routing(expert_ids.to(index_dtype), num_experts,
                                      block_size=block_size, backend=backend)
    assert all(t.dtype == torch.int32 for t in plan)
    assert_plan_invariants(plan, expert_ids, num_experts, block_size)
    reference = sphinx_kernels.moe_routing(expert_ids, num_experts, block_size=block_size,
                                           backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(plan, reference))  # the same plan, bit for bit


@pytest.mark.parametrize("backend", ROUTING_BACKENDS)
def test_all_tokens_to_one_expert(backend):
    expert_ids = torch.full((300, 1), 5, dtype=torch.int32, device=DEVICE)
    plan = sphinx_kernels.moe_routing(expert_ids, 8, block_size=64, backend=backend)
    assert plan.tokens_per_expert.tolist() == [0] * 5 + [300, 0, 0]
    assert plan.padded_offsets.tolist() == [0] * 6 + [320] * 3
    assert_plan_invariants(plan, expert_ids, 8, 64)


@pytest.mark.parametrize("backend", [b for b in ROUTING_BACKENDS if b != "reference"])
def test_kernel_places_an_unchecked_bad_id_nowhere(backend):
    """Kernels stay in bounds on ids that reach them unchecked (a GPU without value checks)."""
    expert_ids = torch.tensor([[0, 1], [7, 1], [-1, 0]], dtype=torch.int32, device=DEVICE)
    tokens_per_expert, _, position, row_to_pair = torch.ops.sphinx_kernels.moe_routing(
        expert_ids, 2, 4, backend)
    assert tokens_per_expert.tolist() == [2, 2]
    assert position[1, 0] == -1 and position[2, 0] == -1
    assert sorted(row_to_pair[row_to_pair >= 0].tolist()) == [0, 1, 3, 5]


def test_compiled_backends_declare_their_expert_limit():
    reasons = MOE_ROUTING_BACKENDS.reasons(MOE_ROUTING_BACKENDS.request(
        "cpu", torch.int32, num_experts=MAX_NATIVE_ROUTING_EXPERTS + 1))
    limit = MAX_NATIVE_ROUTING_EXPERTS
    assert f"num_experts {limit + 1} > {limit}" in " ".join(reasons["cpp"])
    assert reasons["reference"] == []


BAD_INPUTS = [
    ({"expert_ids": lambda a: a["expert_ids"].float()}, TypeError, "expert_ids must have dtype"),
    ({"expert_ids": lambda a: a["expert_ids"][0]}, ValueError, "expert_ids must be 2-D"),
    ({"expert_ids": lambda a: a["expert_ids"][:, :0]}, ValueError, "k >= 1"),
    ({"expert_ids": lambda a: a["expert_ids"] + 2}, ValueError,
     "expert_ids must be in [0, num_experts) = [0, 4), got values in [2, 5]"),
    ({"expert_ids": lambda a: a["expert_ids"] - 1}, ValueError,
     "expert_ids must be in [0, num_experts)"),
    ({"num_experts": lambda a: 0}, ValueError, "num_experts must be >= 1"),
    ({"num_experts": lambda a: 4.0}, TypeError, "num_experts must be an int"),
    ({"block_size": lambda a: 0}, ValueError, "block_size must be >= 1"),
    ({"block_size": lambda a: 2**30}, ValueError, "more than 2^31 grouped rows"),
    # Ints beyond int64 once reached the op's schema (a RuntimeError) when no pair needs a row.
    ({"expert_ids": lambda a: a["expert_ids"][:0], "num_experts": lambda a: 2**70}, ValueError,
     "num_experts must be <= 2147483647"),
    ({"expert_ids": lambda a: a["expert_ids"][:0], "block_size": lambda a: 2**70}, ValueError,
     "block_size must be <= 2147483647"),
    ({"block_size": lambda a: True}, TypeError, "block_size must be an int, got bool"),
]


@pytest.mark.parametrize("changes,error,message", BAD_INPUTS)
@pytest.mark.usefixtures("value_checks_on")
def test_bad_input_raises_naming_the_argument(changes, error, message):
    args = {"expert_ids": torch.tensor([[0, 1], [3, 2], [1, 0]], dtype=torch.int32),
            "num_experts": 4, "block_size": 4}
    args.update({name: change(args) for name, change in changes.items()})
    with pytest.raises(error, match=re.escape(message)):
        sphinx_kernels.moe_routing(args["expert_ids"], args["num_experts"],
                                   block_size=args["block_size"])


@pytest.mark.parametrize("backend", ROUTING_BACKENDS)
def test_opcheck(backend):
    expert_ids = random_expert_ids(37, 8, 2, torch.Generator().manual_seed(7))
    torch.library.opcheck(torch.ops.sphinx_kernels.moe_routing.default,
                          (expert_ids, 8, 16, backend))


@pytest.mark.gpu
def test_gpu_at_mixtral_size():
    num_tokens, num_experts, k = MIXTRAL["num_tokens"], MIXTRAL["num_experts"], MIXTRAL["k"]
    expert_ids = random_expert_ids(num_tokens, num_experts, k, torch.Generator().manual_seed(0))
    reference = sphinx_kernels.moe_routing(expert_ids, num_experts, backend="reference")
    for backend in ("cuda", "triton"):
        plan = sphinx_kernels.moe_routing(expert_ids, num_experts, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(plan, reference)), backend
    request = MOE_ROUTING_BACKENDS.request(expert_ids.device, expert_ids.dtype,
                                           num_experts=num_experts)
    assert MOE_ROUTING_BACKENDS.select(request).name == "cuda"
