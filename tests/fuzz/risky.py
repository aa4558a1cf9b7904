"""The fuzz cases that can end the process, run in a fresh interpreter by test_fuzz_isolated.py (a
crash there is a test failure, not the end of the run):

- valid calls that once crashed: a strided or offset ``out_rows`` (patch_projection's Triton
  kernels wrote out of bounds);
- invalid sizes that once crashed a C++ kernel: plan_layout's counts whose int64 sums wrap;
- index values that reach the kernels unchecked, as they do on a GPU without
  ``SPHINX_KERNELS_CHECK_INPUTS=1`` (the ops' custom ops called directly, past validation): every
  kernel backend stays in bounds and gives the documented result (a NaN or zero row, a pair placed
  nowhere, a row not written).

``main()`` prints the cases it ran as one JSON line after ``COUNTS``, for the parent's summary.
"""
from __future__ import annotations

import json

import torch

from sphinx_kernels.ops.gather_rows import GATHER_ROWS_BACKENDS, gather_rows_reference
from sphinx_kernels.ops.moe_expert_mlp import MOE_EXPERT_MLP_BACKENDS
from sphinx_kernels.ops.moe_permute import MOE_PERMUTE_BACKENDS
from sphinx_kernels.ops.moe_routing import MOE_ROUTING_BACKENDS
from sphinx_kernels.ops.moe_unpermute import MOE_UNPERMUTE_BACKENDS
from tests.fuzz.harness import (
    CASES,
    DEVICE,
    FLOAT_DTYPES,
    explore,
    explore_invalid,
    generator,
    random_floats,
    record,
    seeds,
)
from tests.fuzz.test_fuzz_layout import LAYOUT_BACKENDS, OVERFLOWING_MUTATIONS, call_plan_layout
from tests.fuzz.test_fuzz_layout import layout_call as plan_layout_call
from tests.fuzz.test_fuzz_projection import BACKENDS as PROJECTION_BACKENDS
from tests.fuzz.test_fuzz_projection import check_patch_projection, projection_cases
from tests.variants import same_bits

COUNTS = "COUNTS "
OPS = torch.ops.sphinx_kernels
KERNELS = ("cuda", "cpp", "triton")  # the backends that must stay in bounds by themselves


def kernels_of(table, request=None):
    request = request or table.request(DEVICE, torch.float32)
    return [b for b in table.available(request) if b in KERNELS]


def on_device(*tensors: torch.Tensor):
    return tuple(t.to(DEVICE) for t in tensors)


def unchecked(op: str, backend: str) -> None:
    record("unchecked", op, backend)


def out_of_range(values: torch.Tensor, low: int, high: int, gen) -> torch.Tensor:
    """``values`` (on the device) with about a third of the entries replaced by ints outside
    ``[low, high)``."""
    wild = torch.tensor([low - 1, low - 2**20, high, high + 2**20, 2**31 - 1, -(2**31)])
    pick = torch.rand(values.shape, generator=gen) < 0.35
    choice = wild[torch.randint(len(wild), values.shape, generator=gen)]
    return torch.where(pick, choice.to(values.dtype), values).to(DEVICE)


def fuzz_strided_out_rows():
    for backend in PROJECTION_BACKENDS:
        dtypes = FLOAT_DTYPES if backend == "triton" else FLOAT_DTYPES + (torch.float64,)
        explore(projection_cases(dtypes, out=True, rows_layouts=("offset", "strided")),
                lambda case, b=backend: check_patch_projection(b, case), 12)


def fuzz_overflowing_layouts():
    for backend in LAYOUT_BACKENDS:
        def call(args, b=backend):
            return call_plan_layout(dict(args, backend=b))
        explore_invalid("plan_layout", plan_layout_call, OVERFLOWING_MUTATIONS, call, 4)


def check_unchecked_gather(case):
    gen = generator(case)
    sources = [random_floats((n, 5), torch.float32, gen) for n in (4, 0, 2)]
    # Source ids below -1 are padding too (any negative id is); row ids past their table.
    source_ids = out_of_range(torch.randint(-1, 3, (23,), generator=gen), -1, 3, gen)
    row_ids = out_of_range(torch.randint(0, 4, (23,), generator=gen), 0, 4, gen)
    # The reference's definition: a NaN row for an index outside its table.
    expected = gather_rows_reference(sources, source_ids, row_ids)
    for backend in kernels_of(GATHER_ROWS_BACKENDS):
        got = OPS.gather_rows(sources, source_ids, row_ids, backend)
        assert same_bits(got, expected), f"gather_rows {backend}: unchecked indices"
        unchecked("gather_rows", backend)


def check_unchecked_rotary(case):
    gen = generator(case)
    q = random_floats((9, 2, 8), torch.float32, gen)
    cos, sin = (random_floats((6, 8), torch.float32, gen) for _ in "cs")
    positions = out_of_range(torch.randint(0, 6, (9,), generator=gen), 0, 6, gen)
    bad = (positions < 0) | (positions >= 6)
    q_out, _ = OPS.apply_rotary(q, q[:, :0], cos, sin, positions, False, "triton")
    assert q_out[bad].isnan().all(), "apply_rotary triton: a position outside the table"
    good, _ = OPS.apply_rotary(q[~bad], q[~bad][:, :0], cos, sin, positions[~bad], False,
                               "reference")
    assert torch.allclose(q_out[~bad], good, atol=1e-6), "apply_rotary triton: rows in range"
    unchecked("apply_rotary", "triton")


def check_unchecked_routing(case):
    gen = generator(case)
    ids = out_of_range(torch.randint(0, 5, (11, 2), generator=gen), 0, 5, gen).int()
    valid = (ids >= 0) & (ids < 5)
    counts = torch.bincount(ids[valid].long(), minlength=5).int()
    request = MOE_ROUTING_BACKENDS.request(DEVICE, torch.int32, num_experts=5)
    for backend in kernels_of(MOE_ROUTING_BACKENDS, request):
        tokens_per_expert, _, position, row_to_pair = OPS.moe_routing(ids, 5, 3, backend)
        assert torch.equal(tokens_per_expert, counts), f"moe_routing {backend}: counts"
        assert bool((position[~valid] == -1).all()), f"moe_routing {backend}: placed"
        pairs = valid.flatten().nonzero()[:, 0].int()
        assert torch.equal(row_to_pair[position[valid].long()], pairs), f"moe_routing {backend}"
        unchecked("moe_routing", backend)


def check_unchecked_permutes(case):
    gen = generator(case)
    x = random_floats((7, 6), torch.float32, gen)
    rows = 12
    row_to_pair = out_of_range(torch.randint(-1, 14, (rows,), generator=gen), -1, 14, gen).int()
    position = out_of_range(torch.randint(0, rows, (7, 2), generator=gen), 0, rows, gen).int()
    # (moe_permute's row_to_pair is [-1, T * k); moe_unpermute's position is [0, R).)
    y = random_floats((rows, 6), torch.float32, gen)
    pair = row_to_pair.long()
    inside = (pair >= 0) & (pair < 14)
    permuted = torch.where(inside[:, None], x[torch.where(inside, pair // 2, 0)], 0.0)
    placed = (position >= 0) & (position < rows)
    slots = torch.where(placed[..., None], y[torch.where(placed, position, 0).long()], 0.0)
    for backend in kernels_of(MOE_PERMUTE_BACKENDS):
        got = OPS.moe_permute(x, position, row_to_pair, None, backend)
        assert same_bits(got, permuted), f"moe_permute {backend}: unchecked row_to_pair"
        unchecked("moe_permute", backend)
    for backend in kernels_of(MOE_UNPERMUTE_BACKENDS):
        got = OPS.moe_unpermute(y, position, row_to_pair, None, backend)
        assert torch.allclose(got, slots.sum(1)), f"moe_unpermute {backend}: unchecked position"
        unchecked("moe_unpermute", backend)


def check_unchecked_attention(case):
    gen = generator(case)
    q = random_floats((10, 2, 16), torch.float32, gen)
    k = random_floats((8, 1, 16), torch.float32, gen)
    # cu_seqlens beyond the rows, decreasing or negative; prefixes beyond the keys.
    cu_q = out_of_range(torch.tensor([0, 3, 3, 10]), 0, 11, gen).int()
    cu_k = out_of_range(torch.tensor([0, 2, 6, 8]), 0, 9, gen).int()
    prefix = out_of_range(torch.tensor([1, 0, 2]), 0, 3, gen).int()
    out, lse = OPS.varlen_attention(q, k, k, cu_q, cu_k, prefix, 10, 8, True, 0.25, False,
                                    "triton")
    assert out.shape == q.shape and not out.isnan().any(), "varlen_attention triton: clamped"
    unchecked("varlen_attention", "triton")


def check_unchecked_expert_mlp(case):
    gen = generator(case)
    rows = 12
    x = random_floats((rows, 5), torch.float32, gen)
    weights = [random_floats(shape, torch.float32, gen) for shape in ((3, 4, 5), (3, 4, 5),
                                                                      (3, 5, 4))]
    counts = out_of_range(torch.tensor([4, 0, 3]), 0, 5, gen).int()
    offsets = out_of_range(torch.tensor([0, 4, 4, 8]), 0, rows + 1, gen).int()
    for backend in kernels_of(MOE_EXPERT_MLP_BACKENDS):
        try:
            y, _, _ = OPS.moe_expert_mlp(x, *weights, counts, offsets, False, backend)
        except RuntimeError as error:
            # The C++ kernel refuses a plan whose experts' rows overlap or leave [0, R).
            assert backend == "cpp" and "moe_expert_mlp_native" in str(error), error
        else:
            assert y.shape == x.shape and not y.isnan().any(), f"moe_expert_mlp {backend}: clamped"
        unchecked("moe_expert_mlp", backend)


def check_unchecked_out_rows(case):
    gen = generator(case)
    features = [random_floats((2, 3, 4, 4), torch.float32, gen)]
    weight = random_floats((6, 3), torch.float32, gen)
    out = random_floats((14, 6), torch.float32, gen)
    rows = out_of_range(torch.randperm(14, generator=gen)[:10], 0, 14, gen)
    inside = (rows >= 0) & (rows < 14)
    for norm in (None, torch.ones(6, device=DEVICE)):
        projected = OPS.patch_projection(features, weight, None, norm, None, None, None, 2, 2,
                                         1e-5, "reference")[0]
        expected = out.clone()
        expected[rows[inside]] = projected[inside]
        got = OPS.patch_projection(features, weight, None, norm, None, out, rows, 2, 2, 1e-5,
                                   "triton")[0]
        assert torch.allclose(got, expected, atol=1e-5), "patch_projection triton: out_rows"
        unchecked("patch_projection", "triton")


UNCHECKED = (check_unchecked_gather, check_unchecked_rotary, check_unchecked_routing,
             check_unchecked_permutes, check_unchecked_attention, check_unchecked_expert_mlp,
             check_unchecked_out_rows)


def main():
    fuzz_strided_out_rows()
    fuzz_overflowing_layouts()
    for check in UNCHECKED:
        explore(seeds, check, 12)
    print(COUNTS + json.dumps([[*key, count] for key, count in CASES.items()]))
