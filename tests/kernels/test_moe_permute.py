"""moe_permute on every backend this machine can run: exact against a row-by-row loop, its gradient
(the token's k rows summed) within the tolerance rule (docs/numerics.md), bad inputs, opcheck with
and without the per-pair scale of moe_unpermute's backward."""
from __future__ import annotations

import re

import pytest
import torch

import sphinx_kernels
from sphinx_kernels.ops.moe_permute import MOE_PERMUTE_BACKENDS
from tests.kernels.moe_cases import DEVICE, DTYPES, make_plan
from tests.numerics import GRADIENT_FACTOR, assert_all_within_torch_error
from tests.variants import expanded, same_bits, strided

BACKENDS = MOE_PERMUTE_BACKENDS.available(MOE_PERMUTE_BACKENDS.request(DEVICE, torch.float32))
# (T, E, k, block size): empty, a single token and expert, odd sizes, idle experts.
CASES = [(0, 8, 2, 4), (1, 1, 1, 16), (7, 2, 2, 4), (97, 8, 4, 16), (300, 8, 2, 128)]


def loop_permute(x, plan):
    """The definition, one row at a time."""
    out = torch.zeros(plan.num_padded_rows, x.shape[1], dtype=x.dtype, device=x.device)
    for t, rows in enumerate(plan.position.tolist()):
        for row in rows:
            out[row] = x[t]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16])
@pytest.mark.parametrize("num_tokens,num_experts,k,block_size", CASES)
def test_permute_is_exact(backend, dtype, num_tokens, num_experts, k, block_size, seed):
    gen = torch.Generator().manual_seed(seed)
    plan = make_plan(num_tokens, num_experts, k, block_size, gen, skew=2 * k <= num_experts)
    x = torch.randn(num_tokens, 33, generator=gen).to(dtype).to(DEVICE)
    out = sphinx_kernels.moe_permute(x, plan, backend=backend)
    assert out.dtype == dtype
    assert torch.equal(out, loop_permute(x, plan))


def summed_rows(grad_out, plan):
    """(same dtype, float64) pair of each token's k gradient rows summed by PyTorch."""
    rows = plan.position.long()
    return [(grad_out[rows].sum(1), grad_out.double()[rows].sum(1))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_sums_the_token_rows(backend, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    plan = make_plan(97, 8, 4, 16, gen)
    x = torch.randn(97, 24, generator=gen).to(dtype).to(DEVICE).requires_grad_(True)
    grad_out = torch.randn(plan.num_padded_rows, 24, generator=gen).to(dtype).to(DEVICE)
    sphinx_kernels.moe_permute(x, plan, backend=backend).backward(grad_out)
    first = summed_rows(grad_out, plan)
    assert_all_within_torch_error(
        [x.grad], [first[0][1]],
        lambda g: summed_rows(torch.randn(grad_out.shape, generator=g).to(dtype).to(DEVICE), plan),
        gen, [GRADIENT_FACTOR], ["grad x"], backend, first=first)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_to_pair_of_any_strides(backend, seed):
    """plan.row_to_pair as a strided view (2^30 in the gaps) and expanded (stride 0: every row
    padding): what a contiguous copy gives, bit for bit (the Triton kernel once read it as
    contiguous)."""
    gen = torch.Generator().manual_seed(seed)
    plan = make_plan(37, 8, 2, 4, gen)
    x = torch.randn(37, 9, generator=gen).to(DEVICE)
    expected = sphinx_kernels.moe_permute(x, plan, backend=backend)
    views = plan._replace(row_to_pair=strided(plan.row_to_pair))
    assert same_bits(sphinx_kernels.moe_permute(x, views, backend=backend), expected)
    minus_one = torch.full((1,), -1, dtype=torch.int32, device=DEVICE)
    padding = plan._replace(row_to_pair=expanded(minus_one, (plan.num_padded_rows,)))
    assert same_bits(sphinx_kernels.moe_permute(x, padding, backend=backend),
                     torch.zeros_like(expected))


BAD_INPUTS = [
    ({"x": lambda a: a["x"][:2]}, ValueError, "x has 2 rows but plan.position has 3"),
    ({"x": lambda a: a["x"].int()}, TypeError, "x must have dtype"),
    ({"plan": lambda a: tuple(a["plan"])}, TypeError, "plan must be a RoutingPlan"),
    ({"plan": lambda a: a["plan"]._replace(position=a["plan"].position.long())},
     TypeError, "plan.position must have dtype int32"),
    ({"plan": lambda a: a["plan"]._replace(position=a["plan"].position + 100)},
     ValueError, "plan.position must be in [0, R) = [0, 16)"),
    ({"plan": lambda a: a["plan"]._replace(row_to_pair=a["plan"].row_to_pair.to("meta"))},
     ValueError, "plan.row_to_pair is on meta"),
    ({"plan": lambda a: a["plan"]._replace(row_to_pair=a["plan"].row_to_pair + 7)},
     ValueError, "plan.row_to_pair must be in [-1, T * k) = [-1, 6)"),
    ({"plan": lambda a: a["plan"]._replace(row_to_pair=a["plan"].row_to_pair - 1)},
     ValueError, "plan.row_to_pair must be in [-1, T * k) = [-1, 6)"),
]


@pytest.mark.parametrize("changes,error,message", BAD_INPUTS)
@pytest.mark.usefixtures("value_checks_on")
def test_bad_input_raises_naming_the_argument(changes, error, message):
    expert_ids = torch.tensor([[0, 1], [3, 2], [1, 0]], dtype=torch.int32)
    args = {"x": torch.randn(3, 5), "plan": sphinx_kernels.moe_routing(expert_ids, 4, block_size=4)}
    args.update({name: change(args) for name, change in changes.items()})
    with pytest.raises(error, match=re.escape(message)):
        sphinx_kernels.moe_permute(args["x"], args["plan"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    plan = make_plan(37, 8, 2, 16, torch.Generator().manual_seed(8))
    x = torch.randn(37, 9, device=DEVICE, requires_grad=True)
    for scale in (None, torch.rand(37 * 2, device=DEVICE)):
        torch.library.opcheck(torch.ops.sphinx_kernels.moe_permute.default,
                              (x, plan.position, plan.row_to_pair, scale, backend))


@pytest.mark.gpu
def test_gpu_at_mixtral_size():
    gen = torch.Generator().manual_seed(0)
    plan = make_plan(8192, 8, 2, 128, gen)
    x = torch.randn(8192, 4096, generator=gen).to(torch.bfloat16).cuda()
    assert torch.equal(sphinx_kernels.moe_permute(x, plan, backend="triton"),
                       sphinx_kernels.moe_permute(x, plan, backend="reference"))
