"""moe_unpermute on every backend this machine can run: the gate-weighted sum and both gradients
(rows and weights) within the tolerance rule (docs/numerics.md), zero gradient on padding rows, the
inverse of moe_permute, the same bits on every kernel backend, bad inputs, opcheck with and without
weights, and of the weights' backward (moe_pair_dots)."""
from __future__ import annotations

import re

import pytest
import torch

import sphinx_kernels
from sphinx_kernels.ops.moe_unpermute import MOE_UNPERMUTE_BACKENDS
from tests.kernels.moe_cases import DEVICE, DTYPES, MIXTRAL, make_plan
from tests.numerics import FORWARD_FACTOR, GRADIENT_FACTOR, assert_all_within_torch_error
from tests.variants import same_bits, strided

BACKENDS = MOE_UNPERMUTE_BACKENDS.available(MOE_UNPERMUTE_BACKENDS.request(DEVICE, torch.float32))
# (T, E, k, block size): empty, a single token and expert, odd sizes, idle experts.
CASES = [(0, 8, 2, 4), (1, 1, 1, 16), (7, 2, 2, 4), (97, 8, 4, 16), (300, 8, 2, 128)]
WIDTH = 40


def torch_unpermute(y_grouped, plan, weights):
    """The definition in PyTorch, in the inputs' dtype (float64 inputs: the oracle)."""
    rows = y_grouped[plan.position.long()]  # [T, k, H]
    return (rows * weights.to(rows.dtype)[:, :, None]).sum(1)


def run(unpermute, y_grouped, plan, weights, grad_out):
    """``[out, grad y_grouped, grad weights]`` of ``unpermute(y_grouped, plan, weights)``."""
    y, w = y_grouped.detach().requires_grad_(True), weights.detach().requires_grad_(True)
    out = unpermute(y, plan, w)
    out.backward(grad_out.to(out.dtype))
    return [out.detach(), y.grad, w.grad]


def random_inputs(plan, dtype, gen):
    """(y_grouped, weights, output gradient) for ``plan``."""
    num_tokens, k = plan.position.shape
    return (torch.randn(plan.num_padded_rows, WIDTH, generator=gen).to(dtype).to(DEVICE),
            torch.rand(num_tokens, k, generator=gen).to(DEVICE),
            torch.randn(num_tokens, WIDTH, generator=gen).to(dtype).to(DEVICE))


def torch_pairs(plan, y_grouped, weights, grad_out):
    """(same dtype, float64) pairs of the definition's output and gradients: PyTorch's error."""
    same = run(torch_unpermute, y_grouped, plan, weights, grad_out)
    exact = run(torch_unpermute, y_grouped.double(), plan, weights.double(), grad_out)
    return list(zip(same, exact))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,num_experts,k,block_size", CASES)
def test_output_and_gradients_within_tolerance_of_float64(backend, dtype, num_tokens, num_experts,
                                                          k, block_size, seed):
    gen = torch.Generator().manual_seed(seed)
    plan = make_plan(num_tokens, num_experts, k, block_size, gen)
    inputs = random_inputs(plan, dtype, gen)
    got = run(lambda y, p, w: sphinx_kernels.moe_unpermute(y, p, w, backend=backend), inputs[0],
              plan, *inputs[1:])
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == torch.float32
    padding = plan.row_to_pair < 0
    assert torch.equal(got[1][padding], torch.zeros_like(got[1][padding]))
    first = torch_pairs(plan, *inputs)
    assert_all_within_torch_error(
        got, [exact for _, exact in first],
        lambda g: torch_pairs(plan, *random_inputs(plan, dtype, g)), gen,
        [FORWARD_FACTOR, GRADIENT_FACTOR, GRADIENT_FACTOR],
        ["out", "grad y_grouped", "grad weights"], backend, first=first)


def test_without_weights_it_undoes_permute(seed):
    plan = make_plan(97, 8, 2, 16, torch.Generator().manual_seed(seed))
    # Small integers: every sum is exact in float32.
    x = torch.randint(-8, 8, (97, 16), generator=torch.Generator().manual_seed(seed)).float()
    for backend in BACKENDS:
        grouped = sphinx_kernels.moe_permute(x.to(DEVICE), plan, backend=backend)
        unpermuted = sphinx_kernels.moe_unpermute(grouped, plan, None, backend=backend)
        assert torch.equal(unpermuted, 2 * x.to(DEVICE)), backend


def test_kernel_backends_agree_bitwise_and_are_deterministic(seed):
    """Every backend sums in float32 in slot order, one multiply then one add per slot."""
    gen = torch.Generator().manual_seed(seed)
    plan = make_plan(300, 8, 2, 16, gen)
    y_grouped, weights, _ = random_inputs(plan, torch.float32, gen)
    results = {}
    for backend in BACKENDS:
        first, again = (sphinx_kernels.moe_unpermute(y_grouped, plan, weights, backend=backend)
                        for _ in "12")
        assert torch.equal(first, again), backend
        results[backend] = first
    baseline = next(iter(results.values()))
    assert all(torch.equal(out, baseline) for out in results.values()), list(results)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_and_row_to_pair_of_any_strides(backend, seed):
    """Gate weights whose flattening is a strided view (a column-strided ``[T, k]``) and a strided
    plan.row_to_pair (2^30 in the gaps): the output and gradients of contiguous copies, bit for bit
    (the Triton backward once read both as contiguous)."""
    gen = torch.Generator().manual_seed(seed)
    plan = make_plan(37, 8, 2, 4, gen)
    y_grouped, weights, grad_out = random_inputs(plan, torch.float32, gen)
    expected = run(lambda *a: sphinx_kernels.moe_unpermute(*a, backend=backend), y_grouped, plan,
                   weights, grad_out)
    columns = strided(weights, dim=1)
    assert columns.reshape(-1).stride() == (2,)
    views = plan._replace(row_to_pair=strided(plan.row_to_pair))
    y = y_grouped.detach().requires_grad_(True)
    w = columns.detach().requires_grad_(True)
    out = sphinx_kernels.moe_unpermute(y, views, w, backend=backend)
    out.backward(grad_out)
    assert all(same_bits(a, b) for a, b in zip([out.detach(), y.grad, w.grad], expected))


BAD_INPUTS = [
    ({"y_grouped": lambda a: a["y_grouped"][1:]}, ValueError,
     "y_grouped has 15 rows but plan.row_to_pair has 16"),
    ({"y_grouped": lambda a: a["y_grouped"].int()}, TypeError, "y_grouped must have dtype"),
    ({"weights": lambda a: a["weights"][:, :1]}, ValueError, "weights has shape (3, 1)"),
    ({"weights": lambda a: a["weights"].int()}, TypeError, "weights must have dtype"),
    ({"weights": lambda a: a["weights"].to("meta")}, ValueError, "weights is on meta"),
    ({"plan": lambda a: a["plan"]._replace(position=a["plan"].position + 100)},
     ValueError, "plan.position must be in [0, R) = [0, 16)"),
]


@pytest.mark.parametrize("changes,error,message", BAD_INPUTS)
@pytest.mark.usefixtures("value_checks_on")
def test_bad_input_raises_naming_the_argument(changes, error, message):
    expert_ids = torch.tensor([[0, 1], [3, 2], [1, 0]], dtype=torch.int32)
    plan = sphinx_kernels.moe_routing(expert_ids, 4, block_size=4)
    args = {"y_grouped": torch.randn(plan.num_padded_rows, 5), "plan": plan,
            "weights": torch.rand(3, 2)}
    args.update({name: change(args) for name, change in changes.items()})
    with pytest.raises(error, match=re.escape(message)):
        sphinx_kernels.moe_unpermute(args["y_grouped"], args["plan"], args["weights"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    plan = make_plan(37, 8, 2, 16, torch.Generator().manual_seed(8))
    y_grouped = torch.randn(plan.num_padded_rows, 9, device=DEVICE, requires_grad=True)
    ops = torch.ops.sphinx_kernels
    for weights in (None, torch.rand(37, 2, device=DEVICE, requires_grad=True)):
        torch.library.opcheck(ops.moe_unpermute.default,
                              (y_grouped, plan.position, plan.row_to_pair, weights, backend))
    torch.library.opcheck(ops.moe_pair_dots.default,
                          (torch.randn(37, 9, device=DEVICE), y_grouped.detach(), plan.position,
                           torch.float32, backend))


@pytest.mark.gpu
def test_gpu_at_mixtral_size():
    gen = torch.Generator().manual_seed(0)
    num_tokens, k = MIXTRAL["num_tokens"], MIXTRAL["k"]
    plan = make_plan(num_tokens, MIXTRAL["num_experts"], k, 128, gen)
    grouped = torch.randn(plan.num_padded_rows, MIXTRAL["hidden"], generator=gen).to(
        torch.bfloat16).cuda()
    weights = torch.rand(num_tokens, k, generator=gen).cuda()
    out = sphinx_kernels.moe_unpermute(grouped, plan, weights, backend="triton")

    def pair(g):
        y = torch.randn(grouped.shape, generator=g).to(torch.bfloat16).cuda()
        return [(torch_unpermute(y, plan, weights), torch_unpermute(y.double(), plan,
                                                                   weights.double()))]

    first = [(torch_unpermute(grouped, plan, weights),
              torch_unpermute(grouped.double(), plan, weights.double()))]
    assert_all_within_torch_error([out], [first[0][1]], pair, gen, [FORWARD_FACTOR], ["out"],
                                  "triton", first=first)
