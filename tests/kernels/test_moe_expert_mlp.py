"""moe_expert_mlp on every backend this machine can run: output and the four gradients against a
float64 loop over experts differentiated by autograd, within the tolerance rule (docs/numerics.md);
padding rows never read and zero; determinism; recompute; bad inputs; opcheck. Under the Triton
interpreter the acceptance grid is sampled (a fixed draw of configurations, data from the test's
seed)."""
from __future__ import annotations

import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sphinx_kernels
from sphinx_kernels.ops.moe_expert_mlp import MOE_EXPERT_MLP_BACKENDS
from tests.kernels.moe_cases import DEVICE, random_expert_ids
from tests.numerics import FORWARD_FACTOR, GRADIENT_FACTOR, assert_all_within_torch_error
from tests.variants import expanded, same_bits, strided

BACKENDS = MOE_EXPERT_MLP_BACKENDS.available(MOE_EXPERT_MLP_BACKENDS.request(DEVICE, torch.float32))
WIDTHS = [(48, 100), (96, 200)]  # (H, F): odd widths, not multiples of any tile


# A sample of the acceptance grid (T in {1, 7, 97, 300}, E in {1, 2, 8}, k in {1, 2, 4} <= E, both
# widths, both dtypes, block sizes 16/32, activations stored or recomputed) covering every value of
# each axis; the data comes from the test's seed. float16 stays below ~200 pairs: the interpreter's
# float16 dot products have no BLAS behind them (slow).
CONFIGS = [  # (T, E, k, H, F, block_size, dtype, recompute)
    (1, 1, 1, 48, 100, 16, torch.float16, False),
    (7, 2, 2, 96, 200, 32, torch.float16, True),
    (7, 8, 1, 48, 100, 16, torch.float32, False),  # most experts receive nothing
    (97, 2, 1, 96, 200, 32, torch.float16, True),
    (97, 8, 4, 48, 100, 16, torch.float32, False),
    (300, 1, 1, 48, 100, 32, torch.float32, False),
    (300, 8, 2, 96, 200, 32, torch.float32, True),
]


def make_case(num_tokens, num_experts, k, hidden, ffn, block_size, dtype, gen, expert_ids=None):
    """A plan, grouped rows (padding rows NaN: they must never be read), weights and an output
    gradient (random on padding rows too: it must be ignored there)."""
    if expert_ids is None:
        expert_ids = random_expert_ids(num_tokens, num_experts, k, gen,
                                       skew=2 * k <= num_experts and num_tokens % 2 == 1)
    plan = sphinx_kernels.moe_routing(expert_ids.to(DEVICE), num_experts, block_size=block_size)
    x = torch.randn(num_tokens, hidden, generator=gen, dtype=torch.float64)
    x_grouped = sphinx_kernels.moe_permute(x.to(dtype).to(DEVICE), plan)
    x_grouped[plan.row_to_pair < 0] = float("nan")
    weights = [torch.randn(num_experts, *shape, generator=gen, dtype=torch.float64) / fan_in ** 0.5
               for shape, fan_in in (((ffn, hidden), hidden), ((ffn, hidden), hidden),
                                     ((hidden, ffn), ffn))]
    grad_y = torch.randn(plan.num_padded_rows, hidden, generator=gen, dtype=torch.float64)
    return plan, x_grouped, [w.to(dtype).to(DEVICE) for w in weights], grad_y.to(dtype).to(DEVICE)


def loop_over_experts(x_grouped, w1, w3, w2, plan):
    """The definition with autograd: each expert's rows through its SwiGLU MLP, zero elsewhere."""
    y = torch.zeros(x_grouped.shape, dtype=x_grouped.dtype, device=x_grouped.device)
    counts, offsets = plan.tokens_per_expert.tolist(), plan.padded_offsets.tolist()
    parts = []
    for e, (start, count) in enumerate(zip(offsets, counts)):
        x = x_grouped[start:start + count]
        h = torch.nn.functional.silu(x @ w1[e].T) * (x @ w3[e].T)
        parts.append((start, count, h @ w2[e].T))
    index = torch.cat([torch.arange(s, s + c) for s, c, _ in parts]).to(x_grouped.device)
    values = torch.cat([p for _, _, p in parts])
    return y.index_put((index,), values)


def run(fn, x_grouped, weights, grad_y, plan, dtype=None):
    """``fn``'s output and gradients (x, w1, w3, w2), inputs cast to ``dtype``; NaN padding rows of
    x_grouped are zeroed for the loop (which never reads them either)."""
    dtype = dtype or x_grouped.dtype
    inputs = [t.detach().to(dtype).requires_grad_(True) for t in (x_grouped, *weights)]
    y = fn(*inputs, plan)
    y.backward(grad_y.to(dtype))
    return [y.detach()] + [t.grad for t in inputs]


def clean(x_grouped, plan):
    return torch.where((plan.row_to_pair >= 0)[:, None], x_grouped, 0)


NAMES = ("y", "grad x", "grad w1", "grad w3", "grad w2")


def loop_pairs(plan, x_grouped, weights, grad_y):
    """(same dtype, float64) pairs of the loop's output and gradients: PyTorch's own error."""
    x = clean(x_grouped, plan)
    return list(zip(run(loop_over_experts, x, weights, grad_y, plan),
                    run(loop_over_experts, x, weights, grad_y, plan, torch.float64)))


def check_against_float64(backend, plan, x_grouped, weights, grad_y, recompute, gen, what):
    got = run(lambda *a: sphinx_kernels.moe_expert_mlp(*a, recompute=recompute, backend=backend),
              x_grouped, weights, grad_y, plan)
    padding = plan.row_to_pair < 0
    assert got[0].dtype == x_grouped.dtype
    assert (got[0][padding] == 0).all() and (got[1][padding] == 0).all(), "padding rows not zero"
    first = loop_pairs(plan, x_grouped, weights, grad_y)

    def draw(g):
        fresh = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype).to(DEVICE)
                 for t in (x_grouped, grad_y)]
        return loop_pairs(plan, fresh[0], weights, fresh[1])

    assert_all_within_torch_error(got, [exact for _, exact in first], draw, gen,
                                  [FORWARD_FACTOR] + [GRADIENT_FACTOR] * 4, NAMES, what,
                                  first=first)
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "T{}-E{}-k{}-H{}-F{}-b{}-{}-{}".format(
    *c[:6], str(c[6]).removeprefix("torch."), "recompute" if c[7] else "store"))
def test_expert_mlp_and_gradients_within_tolerance_of_float64(backend, config, seed):
    *shape, block_size, dtype, recompute = config
    gen = torch.Generator().manual_seed(seed)
    check_against_float64(backend, *make_case(*shape, block_size, dtype, gen), recompute, gen,
                          backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_tokens_to_one_expert_and_no_tokens(backend, seed):
    gen = torch.Generator().manual_seed(seed)
    expert_ids = torch.full((97, 1), 2, dtype=torch.int32)  # experts 0, 1 and 3 receive nothing
    case = make_case(97, 4, 1, 48, 100, 32, torch.float32, gen, expert_ids=expert_ids)
    got = check_against_float64(backend, *case, False, gen, backend)
    for grad_w in got[2:]:
        assert (grad_w[[0, 1, 3]] == 0).all()
    empty = make_case(0, 8, 2, 48, 100, 16, torch.float16, gen)
    assert empty[1].shape[0] > 0  # R > 0 padding rows even without tokens
    got = run(lambda *a: sphinx_kernels.moe_expert_mlp(*a, backend=backend), *empty[1:], empty[0])
    assert all((t == 0).all() for t in got)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_and_recompute_gives_the_same_bits(backend, seed):
    plan, x_grouped, weights, grad_y = make_case(97, 8, 2, 48, 100, 16, torch.float32,
                                                 torch.Generator().manual_seed(seed))
    results = [run(lambda *a: sphinx_kernels.moe_expert_mlp(*a, recompute=recompute,
                                                            backend=backend),
                   x_grouped, weights, grad_y, plan) for recompute in (False, False, True)]
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


class _RecomputeFlags(TorchDispatchMode):
    """Records the ``recompute`` flag of every moe_expert_mlp custom-op call."""

    def __init__(self):
        super().__init__()
        self.flags = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.sphinx_kernels.moe_expert_mlp.default:
            self.flags.append(args[6])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pre_activations_kept_only_for_a_backward(backend, seed):
    """With no gradient to compute (no_grad, inference_mode, or weights and rows that need none)
    the forward keeps no pre-activations, and gives the same bits as one that does."""
    plan, x_grouped, weights, _ = make_case(7, 2, 2, 48, 100, 16, torch.float32,
                                            torch.Generator().manual_seed(seed))
    x_grouped = x_grouped.nan_to_num(0.0)
    trainable = [w.clone().requires_grad_() for w in weights]
    calls = []
    for context, params, recompute in ((torch.enable_grad, trainable, False),
                                       (torch.enable_grad, trainable, True),
                                       (torch.no_grad, trainable, False),
                                       (torch.inference_mode, weights, False),
                                       (torch.enable_grad, weights, False)):
        with context(), _RecomputeFlags() as spy:
            y = sphinx_kernels.moe_expert_mlp(x_grouped, *params, plan, recompute=recompute,
                                              backend=backend)
        calls.append((spy.flags, y.detach().clone()))
    assert [flags for flags, _ in calls] == [[False], [True], [True], [True], [True]]
    assert all(torch.equal(calls[0][1], y) for _, y in calls[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_gets_no_zero_filled_gradient_for_the_pre_activations(backend, seed):
    """h1 and h3 are outputs for the backward only: autograd passes it None for them, not two
    zero-filled [R, F] tensors (once a tenth of a CPU layer's forward and backward)."""
    plan, x_grouped, weights, grad_y = make_case(97, 2, 1, 48, 100, 16, torch.float32,
                                                 torch.Generator().manual_seed(seed))
    inputs = [t.nan_to_num(0.0).requires_grad_(True) for t in (x_grouped, *weights)]
    y = sphinx_kernels.moe_expert_mlp(*inputs, plan, backend=backend)
    pre_activation_shape = [plan.num_padded_rows, weights[0].shape[1]]
    with torch.profiler.profile(record_shapes=True) as profile:
        y.backward(grad_y)
    fills = [event.name for event in profile.events()
             if event.name in ("aten::zeros_like", "aten::zeros", "aten::zero_", "aten::fill_")
             and pre_activation_shape in event.input_shapes]
    assert not fills and inputs[0].grad is not None


def expert_mlp(backend):
    return lambda *args: sphinx_kernels.moe_expert_mlp(*args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_counts_of_any_strides(backend, seed):
    """plan.tokens_per_expert and plan.padded_offsets as strided views (2^30 in the gaps) and
    expanded (stride 0: every expert empty): the output and gradients of contiguous copies, bit
    for bit (the Triton kernels once read them as contiguous)."""
    plan, x_grouped, weights, grad_y = make_case(29, 4, 2, 24, 40, 4, torch.float32,
                                                 torch.Generator().manual_seed(seed))
    expected = run(expert_mlp(backend), x_grouped, weights, grad_y, plan)
    views = plan._replace(tokens_per_expert=strided(plan.tokens_per_expert),
                          padded_offsets=strided(plan.padded_offsets))
    got = run(expert_mlp(backend), x_grouped, weights, grad_y, views)
    assert all(same_bits(a, b) for a, b in zip(got, expected))
    zero = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    empty = plan._replace(tokens_per_expert=expanded(zero, (4,)),
                          padded_offsets=expanded(zero, (5,)))
    got = run(expert_mlp(backend), x_grouped, weights, grad_y, empty)
    assert all(same_bits(a, torch.zeros_like(a)) for a in got)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_rows_and_weights(backend, seed):
    """x_grouped every other column of a wider tensor (NaN in the gaps), w1 column-major per
    expert, w3 every other expert of a longer stack, w2 as given: within tolerance, like contiguous
    inputs (a kernel reading any of them as contiguous reads NaN or the wrong weights)."""
    gen = torch.Generator().manual_seed(seed)
    plan, x_grouped, (w1, w3, w2), grad_y = make_case(29, 4, 2, 24, 40, 4, torch.float32, gen)
    weights = [w1.transpose(1, 2).contiguous().transpose(1, 2), strided(w3), w2]
    check_against_float64(backend, plan, strided(x_grouped, dim=1), weights, grad_y, False, gen,
                          f"{backend}, strided")


@pytest.mark.skipif("cpp" not in BACKENDS, reason="no C++ CPU kernel on this device")
@pytest.mark.parametrize("recompute", [False, True])
def test_cpp_bfloat16(recompute, seed):
    """bfloat16, which the Triton interpreter cannot do (the CONFIGS leave it out), through the
    compiled CPU op and its backward. (float64: tests/fuzz/test_fuzz_moe.py.)"""
    gen = torch.Generator().manual_seed(seed)
    check_against_float64("cpp", *make_case(37, 4, 2, 48, 100, 16, torch.bfloat16, gen),
                          recompute, gen, "cpp, bfloat16")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poisoned", [0, 1, 2], ids=["w1", "w3", "w2"])
def test_non_finite_weights_reach_only_their_experts_rows(backend, poisoned, seed):
    """A NaN and an inf in one expert's weights turn that expert's rows NaN; every other row (other
    experts', padding) and the other experts' weight gradients keep their bits (the Triton kernels
    once multiplied each row of a tile, padding included, by all of the tile's experts' weights).
    Block size 4: each 64-row interpreter tile spans several experts."""
    plan, x_grouped, weights, grad_y = make_case(29, 4, 2, 24, 40, 4, torch.float32,
                                                 torch.Generator().manual_seed(seed))
    clean_run = run(expert_mlp(backend), x_grouped, weights, grad_y, plan)
    expert = int(plan.tokens_per_expert.argmax())
    bad = [w.clone() for w in weights]
    bad[poisoned][expert, 0, 0] = float("nan")
    bad[poisoned][expert, 1, 1] = float("inf")
    got = run(expert_mlp(backend), x_grouped, bad, grad_y, plan)
    start = int(plan.padded_offsets[expert])
    rows = torch.zeros(plan.num_padded_rows, dtype=torch.bool, device=DEVICE)
    rows[start:start + int(plan.tokens_per_expert[expert])] = True
    assert got[0][rows].isnan().any(dim=1).all()
    for name, a, b in zip(("y", "grad x"), got[:2], clean_run[:2]):
        assert same_bits(a[~rows], b[~rows]), name
    others = [e for e in range(4) if e != expert]
    for name, a, b in zip(("grad w1", "grad w3", "grad w2"), got[2:], clean_run[2:]):
        assert same_bits(a[others], b[others]), name


# ----------------------------------------------------------------------------------------------
# Bad input


def bad_call(**changes):
    """One call on valid CPU inputs (index values are checked there), with ``changes`` applied."""
    expert_ids = torch.tensor([[0, 1], [2, 1], [1, 0]], dtype=torch.int32)
    plan = sphinx_kernels.moe_routing(expert_ids, 3, block_size=4)
    args = {"x": torch.randn(plan.num_padded_rows, 5), "w1": torch.randn(3, 7, 5),
            "w3": torch.randn(3, 7, 5), "w2": torch.randn(3, 5, 7), "plan": plan,
            "recompute": False}
    args.update({name: change(args) for name, change in changes.items()})
    return sphinx_kernels.moe_expert_mlp(args["x"], args["w1"], args["w3"], args["w2"],
                                         args["plan"], recompute=args["recompute"])


BAD_INPUTS = [
    ({"x": lambda a: a["x"][1:]}, ValueError, "x_grouped has 11 rows but plan.row_to_pair has 12"),
    ({"x": lambda a: a["x"].int()}, TypeError, "x_grouped must have dtype"),
    ({"x": lambda a: a["x"][None]}, ValueError, "x_grouped must be 2-D"),
    ({"w1": lambda a: a["w1"].double()}, TypeError,
     "w1 has dtype float64 but x_grouped has float32"),
    ({"w2": lambda a: a["w2"].to("meta")}, ValueError, "w2 is on meta"),
    ({"w3": lambda a: a["w3"][:, :6]}, ValueError, "w3 has shape (3, 6, 5), expected (3, 7, 5)"),
    ({"w2": lambda a: a["w2"].transpose(1, 2)}, ValueError,
     "w2 has shape (3, 7, 5), expected (3, 5, 7)"),
    ({"w1": lambda a: a["w1"][:2], "w3": lambda a: a["w3"][:2], "w2": lambda a: a["w2"][:2]},
     ValueError, "w1 has shape (2, 7, 5), expected (3, 7, 5)"),
    ({"w1": lambda a: a["w1"][0]}, ValueError, "w1 must be 3-D"),
    ({"plan": lambda a: tuple(a["plan"])}, TypeError, "plan must be a RoutingPlan"),
    ({"plan": lambda a: a["plan"]._replace(padded_offsets=a["plan"].padded_offsets[:-1])},
     ValueError, "plan.padded_offsets has 3 entries but plan.tokens_per_expert has 3"),
    ({"plan": lambda a: a["plan"]._replace(padded_offsets=a["plan"].padded_offsets * 2)},
     ValueError, "plan.padded_offsets must start at 0"),
    ({"plan": lambda a: a["plan"]._replace(tokens_per_expert=a["plan"].tokens_per_expert.long())},
     TypeError, "plan.tokens_per_expert must have dtype int32"),
    ({"recompute": lambda a: 1}, TypeError, "recompute must be a bool"),
    ({"plan": lambda a: a["plan"]._replace(tokens_per_expert=a["plan"].tokens_per_expert - 9)},
     ValueError, "plan.tokens_per_expert must be >= 0"),
]


@pytest.mark.parametrize("changes,error,message", BAD_INPUTS)
def test_bad_input_raises_naming_the_argument(changes, error, message):
    with pytest.raises(error, match=re.escape(message)):
        bad_call(**changes)


# ----------------------------------------------------------------------------------------------
# opcheck


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recompute", [False, True])
def test_opcheck(backend, recompute):
    plan, x_grouped, weights, grad_y = make_case(13, 2, 2, 24, 40, 16, torch.float32,
                                                 torch.Generator().manual_seed(3))
    x_grouped = clean(x_grouped, plan).requires_grad_(True)
    weights = [w.requires_grad_(True) for w in weights]
    args = (x_grouped, *weights, plan.tokens_per_expert, plan.padded_offsets, recompute, backend)
    torch.library.opcheck(torch.ops.sphinx_kernels.moe_expert_mlp.default, args)
    _, h1, h3 = torch.ops.sphinx_kernels.moe_expert_mlp(
        *(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    torch.library.opcheck(torch.ops.sphinx_kernels.moe_expert_mlp_backward.default,
                          (grad_y, x_grouped.detach(), *(w.detach() for w in weights),
                           plan.tokens_per_expert, plan.padded_offsets, h1, h3, backend))


# ----------------------------------------------------------------------------------------------
# GPU: Mixtral-8x7B sizes in bfloat16 against a float32 reference (skipped without a GPU).


@pytest.mark.gpu
@pytest.mark.parametrize("recompute", [False, True])
def test_gpu_bf16_at_mixtral_size(recompute):
    """H = 4096, F = 14336, E = 8, k = 2, 4096 tokens; the Triton kernels in bf16 against the
    loop over experts in float64, judged by the same loop's own bf16 error."""
    gen = torch.Generator().manual_seed(0)
    plan, x_grouped, weights, grad_y = make_case(4096, 8, 2, 4096, 14336, 128, torch.bfloat16, gen)
    assert torch.backends.cuda.matmul.allow_tf32 is False
    check_against_float64("triton", plan, x_grouped, weights, grad_y, recompute, gen, "bf16")
