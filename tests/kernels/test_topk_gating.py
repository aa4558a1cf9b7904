"""topk_gating on every backend this machine can run: gates, chosen experts and the two losses, and
the gradient of the logits, against a float64 reference within the tolerance rule
(docs/numerics.md); ties; outputs left out of the loss; bad inputs; opcheck; determinism across
backends."""
from __future__ import annotations

import re

import pytest
import torch

import sphinx_kernels
from sphinx_kernels.ops.topk_gating import TOPK_GATING_BACKENDS, topk_gating_reference
from tests.kernels.moe_cases import DEVICE, DTYPES, MIXTRAL, random_logits
from tests.numerics import FORWARD_FACTOR, GRADIENT_FACTOR, assert_all_within_torch_error
from tests.variants import same_bits, strided

BACKENDS = TOPK_GATING_BACKENDS.available(TOPK_GATING_BACKENDS.request(DEVICE, torch.float32))
# (T, E, k): empty, a single token and expert, odd sizes, more slots than half the experts.
CASES = [(0, 8, 2), (1, 1, 1), (7, 2, 1), (97, 8, 4), (300, 8, 2)]
NAMES = ("weights", "load_balancing_loss", "z_loss")


def gating_outputs(gating):
    """The float outputs, for comparison: weights and the two losses."""
    return [gating.weights, gating.load_balancing_loss, gating.z_loss]


def gating_pairs(logits, k, renormalize):
    """(same dtype, float64) pairs of the reference's float outputs: PyTorch's own error."""
    return list(zip(gating_outputs(topk_gating_reference(logits, k, renormalize)),
                    gating_outputs(topk_gating_reference(logits.double(), k, renormalize))))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,num_experts,k", CASES)
@pytest.mark.parametrize("renormalize", [True, False])
def test_forward_within_tolerance_of_float64(backend, dtype, num_tokens, num_experts, k,
                                             renormalize, seed):
    check_forward(backend, dtype, num_tokens, num_experts, k, renormalize, seed)


def check_forward(backend, dtype, num_tokens, num_experts, k, renormalize, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = random_logits(num_tokens, num_experts, dtype, gen)
    got = sphinx_kernels.topk_gating(logits, k, renormalize=renormalize, backend=backend)
    expected = topk_gating_reference(logits.double(), k, renormalize)
    assert got.weights.dtype == torch.float32 and got.expert_ids.dtype == torch.int32
    assert torch.equal(got.expert_ids, expected.expert_ids)
    assert torch.equal(got.tokens_per_expert, expected.tokens_per_expert)
    assert int(got.tokens_per_expert.sum()) == num_tokens * k
    assert_all_within_torch_error(
        gating_outputs(got), gating_outputs(expected),
        lambda g: gating_pairs(random_logits(num_tokens, num_experts, dtype, g), k, renormalize),
        gen, [FORWARD_FACTOR] * 3, NAMES, backend,
        first=gating_pairs(logits, k, renormalize))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lower_expert_id(backend, seed):
    """Integer logits from {0, 1, 2}: equal logits give bit-equal probabilities, so many ties."""
    gen = torch.Generator().manual_seed(seed)
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


def random_gradients(num_tokens, k, gen, loss_weights=(0.7, 0.3)):
    """An output gradient of the weights, and the weights of the two losses."""
    return (torch.randn(num_tokens, k, generator=gen, dtype=torch.float64).to(DEVICE),
            *loss_weights)


def gradient_pairs(logits, k, renormalize, grads):
    """(same dtype, float64) pair of the reference's gradient of the logits."""
    return [(gating_gradient(logits, k, renormalize, grads, topk_gating_reference),
             gating_gradient(logits.double(), k, renormalize, grads, topk_gating_reference))]


def assert_gradient_within_torch_error(backend, logits, k, renormalize, grads, gen):
    def kernel(x, k, renormalize):
        return sphinx_kernels.topk_gating(x, k, renormalize=renormalize, backend=backend)

    got = gating_gradient(logits, k, renormalize, grads, kernel)
    first = gradient_pairs(logits, k, renormalize, grads)
    num_tokens, num_experts = logits.shape
    assert got.dtype == logits.dtype
    assert_all_within_torch_error(
        [got], [first[0][1]],
        lambda g: gradient_pairs(random_logits(num_tokens, num_experts, logits.dtype, g), k,
                                 renormalize, random_gradients(num_tokens, k, g, grads[1:])),
        gen, [GRADIENT_FACTOR], ["grad"], backend, first=first)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,num_experts,k", CASES[1:])
@pytest.mark.parametrize("renormalize", [True, False])
def test_gradient_within_tolerance_of_float64(backend, dtype, num_tokens, num_experts, k,
                                              renormalize, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = random_logits(num_tokens, num_experts, dtype, gen)
    assert_gradient_within_torch_error(backend, logits, k, renormalize,
                                       random_gradients(num_tokens, k, gen), gen)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="no C++ CPU kernel on this device")
@pytest.mark.parametrize("num_tokens,num_experts,k", [(59, 4, 4), (300, 8, 2)])
def test_cpp_bfloat16_and_every_expert_chosen(num_tokens, num_experts, k, seed):
    """bfloat16 (which the Triton interpreter cannot do, so DTYPES leaves it out) and k = E on the
    compiled CPU kernel: the gates, losses and the gradient through its op."""
    check_forward("cpp", torch.bfloat16, num_tokens, num_experts, k, True, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    logits = random_logits(num_tokens, num_experts, torch.bfloat16, gen)
    assert_gradient_within_torch_error("cpp", logits, k, True,
                                       random_gradients(num_tokens, k, gen), gen)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_strided_logits_give_the_bits_of_contiguous_ones(backend, seed):
    """The kernels read logits through their strides: a column-major copy and every other column
    of a wider tensor (NaN in the gaps) give the contiguous logits' outputs, bit for bit (torch's
    reductions in the reference sum in another order for other strides)."""
    logits = random_logits(37, 6, torch.float32, torch.Generator().manual_seed(seed))
    expected = sphinx_kernels.topk_gating(logits, 3, backend=backend)
    for view in (logits.T.contiguous().T, strided(logits, dim=1)):
        got = sphinx_kernels.topk_gating(view, 3, backend=backend)
        assert all(same_bits(a, b) for a, b in zip(got, expected)), view.stride()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_of_one_loss_alone(backend, seed):
    """Outputs left out of the loss contribute nothing (their gradients arrive as None)."""
    gen = torch.Generator().manual_seed(seed)
    logits = random_logits(33, 8, torch.float32, gen)
    got = logits.detach().requires_grad_(True)
    sphinx_kernels.topk_gating(got, 2, backend=backend).z_loss.backward()
    # The z-loss alone: zero gradients of the weights and of the load-balancing loss.
    grads = (torch.zeros(33, 2, dtype=torch.float64, device=DEVICE), 0.0, 1.0)
    first = gradient_pairs(logits, 2, True, grads)
    assert_all_within_torch_error(
        [got.grad], [first[0][1]],
        lambda g: gradient_pairs(random_logits(33, 8, torch.float32, g), 2, True, grads), gen,
        [GRADIENT_FACTOR], ["grad of the z-loss"], backend, first=first)


def test_kernel_backends_agree_bitwise_and_are_deterministic(seed):
    logits = random_logits(300, 8, torch.float32, torch.Generator().manual_seed(seed))
    results = {}
    for backend in BACKENDS:
        first, again = (sphinx_kernels.topk_gating(logits, 2, backend=backend) for _ in "12")
        assert all(torch.equal(a, b) for a, b in zip(first, again)), backend
        results[backend] = first.expert_ids
    baseline = next(iter(results.values()))
    for backend, expert_ids in results.items():
        assert torch.equal(expert_ids, baseline), backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_rows_follow_the_documented_rule(backend, dtype, seed):
    """A row holding a NaN or +inf, or only -inf, goes to experts 0 .. k-1 with NaN gates, counted
    in tokens_per_expert; both losses turn NaN; every other row (one with some -inf logits among
    them) keeps its choice and bits; the gradient is NaN on those rows only (the Triton kernel
    once returned expert id E for them and left them out of the counts)."""
    gen = torch.Generator().manual_seed(seed)
    logits = random_logits(12, 6, dtype, gen)
    bad = [1, 4, 5, 9]
    logits[1, 3] = float("nan")
    logits[4, 0] = float("inf")
    logits[5] = float("-inf")
    logits[9, 2], logits[9, 5] = float("inf"), float("nan")
    logits[7, [0, 2, 3, 4]] = float("-inf")  # two experts left for k = 3: a valid row
    good = [t for t in range(12) if t not in bad]
    got = sphinx_kernels.topk_gating(logits, 3, backend=backend)
    assert got.expert_ids[bad].tolist() == [[0, 1, 2]] * len(bad)
    assert got.weights[bad].isnan().all() and not got.weights[good].isnan().any()
    counts = torch.bincount(got.expert_ids.flatten().long(), minlength=6).int()
    assert torch.equal(got.tokens_per_expert, counts)
    assert got.load_balancing_loss.isnan() and got.z_loss.isnan()
    alone = sphinx_kernels.topk_gating(logits[good], 3, backend=backend)
    assert torch.equal(got.expert_ids[good], alone.expert_ids)
    assert torch.equal(got.weights[good], alone.weights)
    grads = (torch.randn(12, 3, generator=gen, dtype=torch.float64).to(DEVICE), 0.7, 0.3)
    grad = gating_gradient(logits, 3, True, grads,
                           lambda x, k, r: sphinx_kernels.topk_gating(x, k, renormalize=r,
                                                                      backend=backend))
    assert grad.isnan().any(dim=1).tolist() == [t in bad for t in range(12)]


BAD_INPUTS = [
    ({"logits": lambda a: a["logits"].long()}, TypeError, "logits must have dtype"),
    ({"logits": lambda a: a["logits"].double()}, TypeError, "logits must have dtype"),
    ({"logits": lambda a: a["logits"][None]}, ValueError, "logits must be 2-D"),
    ({"logits": lambda a: a["logits"][:, :0]}, ValueError, "logits must have at least"),
    ({"k": lambda a: 5}, ValueError, "k must be in [1, E] = [1, 4]"),
    ({"k": lambda a: 0}, ValueError, "k must be in [1, E] = [1, 4]"),
    ({"k": lambda a: 2.0}, TypeError, "k must be an int"),
    ({"renormalize": lambda a: 1}, TypeError, "renormalize must be a bool"),
]


@pytest.mark.parametrize("changes,error,message", BAD_INPUTS)
def test_bad_input_raises_naming_the_argument(changes, error, message):
    args = {"logits": torch.randn(6, 4), "k": 2, "renormalize": True}
    args.update({name: change(args) for name, change in changes.items()})
    with pytest.raises(error, match=re.escape(message)):
        sphinx_kernels.topk_gating(args["logits"], args["k"], renormalize=args["renormalize"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    logits = random_logits(37, 8, torch.float32, torch.Generator().manual_seed(7),
                           requires_grad=True)
    ops = torch.ops.sphinx_kernels
    torch.library.opcheck(ops.topk_gating.default, (logits, 2, True, backend))
    gating = ops.topk_gating(logits.detach(), 2, True, backend)
    scalar = torch.tensor(0.5, device=DEVICE)
    torch.library.opcheck(ops.topk_gating_backward.default,
                          (logits.detach(), gating[1], gating[0], gating[4],
                           torch.randn(37, 2, device=DEVICE), scalar, scalar, True, backend))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_at_mixtral_size(dtype):
    gen = torch.Generator().manual_seed(0)
    num_tokens, num_experts, k = MIXTRAL["num_tokens"], MIXTRAL["num_experts"], MIXTRAL["k"]
    logits = random_logits(num_tokens, num_experts, dtype, gen)
    got = sphinx_kernels.topk_gating(logits, k, backend="triton")
    expected = topk_gating_reference(logits.double(), k)
    assert torch.equal(got.expert_ids, expected.expert_ids)
    assert_all_within_torch_error(
        gating_outputs(got), gating_outputs(expected),
        lambda g: gating_pairs(random_logits(num_tokens, num_experts, dtype, g), k, True), gen,
        [FORWARD_FACTOR] * 3, NAMES, "triton", first=gating_pairs(logits, k, True))
    assert_gradient_within_torch_error("triton", logits, k, True,
                                       random_gradients(num_tokens, k, gen, (0.01, 0.001)), gen)
