"""Fuzzing the MoE ops (topk_gating, moe_routing, moe_permute, moe_unpermute, moe_expert_mlp) on
every backend that runs here: random valid inputs (no tokens, idle experts, block sizes from 1,
every layout of every tensor argument and of the routing plan's fields, NaN / inf) against the
reference and float64 math, inputs never modified; every class of invalid input, expecting a
TypeError / ValueError naming the argument."""
from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st

import sphinx_kernels as sk
from sphinx_kernels.ops.moe_expert_mlp import MOE_EXPERT_MLP_BACKENDS, moe_expert_mlp_reference
from sphinx_kernels.ops.moe_permute import MOE_PERMUTE_BACKENDS, moe_permute_reference
from sphinx_kernels.ops.moe_routing import MOE_ROUTING_BACKENDS, moe_routing_reference
from sphinx_kernels.ops.moe_unpermute import MOE_UNPERMUTE_BACKENDS, moe_unpermute_reference
from sphinx_kernels.ops.topk_gating import TOPK_GATING_BACKENDS, topk_gating_reference
from tests.fuzz.harness import (
    ALL_FLOATS,
    BAD_BOOLS,
    BAD_INTS,
    DEVICE,
    INDEX_DTYPES,
    NOT_TENSORS,
    assert_all_close,
    assert_bits,
    assert_close_to_float64,
    explore,
    explore_invalid,
    generator,
    gradients,
    layouts,
    plain,
    random_floats,
    replacing,
    run_backends,
    seeds,
    with_layout,
)
from tests.numerics import interpreter_rounds_bf16

PLAN_LAYOUTS = ("contiguous", "offset", "strided")
META = torch.device("meta")


def available(table, dtype=torch.float32):
    return table.available(table.request(DEVICE, dtype))


def arithmetic_dtypes(backend, table_dtypes):
    """The float dtypes fuzzed on ``backend``: bf16 arithmetic only off the interpreter."""
    return tuple(d for d in ALL_FLOATS if d in table_dtypes and not (
        d == torch.bfloat16 and interpreter_rounds_bf16(backend, d)))


def with_plan_layouts(plan, chosen):
    """The plan with each field in its layout (``chosen``: one per field)."""
    return type(plan)(*(with_layout(t, layout) for t, layout in zip(plan, chosen)))


def plan_layouts():
    return st.lists(layouts(PLAN_LAYOUTS), min_size=4, max_size=4)


# ----------------------------------------------------------------------------------------------
# topk_gating

GATING_BACKENDS = available(TOPK_GATING_BACKENDS)
GATING_EXAMPLES = {"cpp": 40, "triton": 30, "reference": 60}
NEAR_TIE = 64 * torch.finfo(torch.float32).eps


@st.composite
def gating_cases(draw, dtypes):
    experts = draw(st.integers(1, 9))
    return dict(tokens=draw(st.integers(0, 20)), experts=experts, k=draw(st.integers(1, experts)),
                renormalize=draw(st.booleans()), dtype=draw(st.sampled_from(dtypes)),
                layout=draw(layouts()), dim=draw(st.integers(0, 1)),
                ties=draw(st.booleans()), special=draw(st.sampled_from((0, 0, .05))),
                masked=draw(st.booleans()), grad=draw(st.booleans()), seed=draw(seeds))


def gating_inputs(case):
    gen = generator(case["seed"])
    shape = (case["tokens"], case["experts"])
    if case["ties"]:  # small integers: exact ties everywhere
        logits = torch.randint(0, 3, shape, generator=gen).to(case["dtype"]).to(DEVICE)
    else:
        logits = random_floats(shape, case["dtype"], gen, scale=2.0, special=case["special"])
    if case["masked"] and case["tokens"]:  # whole rows of -inf, and rows with some -inf
        logits[torch.rand(shape, generator=gen) < 0.3] = float("-inf")
        logits[0] = float("-inf")
    grads = (random_floats((case["tokens"], case["k"]), torch.float32, gen), 0.7, 0.3)
    return with_layout(logits, case["layout"], case["dim"], requires_grad=case["grad"]), grads


def gating_outputs(run, logits, case, grads):
    """The gating's fields and, when the case asks, the logits' gradient of weights . g + a lb +
    b z."""
    gating = run(logits, case["k"], case["renormalize"])
    outputs = [t.detach() for t in gating]
    if case["grad"]:
        loss = ((gating.weights * grads[0].to(gating.weights.dtype)).sum()
                + grads[1] * gating.load_balancing_loss + grads[2] * gating.z_loss)
        outputs += gradients([loss], [logits], [torch.ones_like(loss)])
    return outputs


def reference_gating(logits, case, grads, dtype):
    x = plain(logits, dtype, requires_grad=case["grad"])
    return gating_outputs(topk_gating_reference, x, case, grads)


def check_ids(got_ids, exact_probs, exact_ids, undefined, what):
    """The chosen experts: in range, distinct per token; the float64 reference's on every row
    without a near tie; where near ties are, experts of the same probabilities."""
    num_tokens, k = got_ids.shape
    assert got_ids.numel() == 0 or (0 <= int(got_ids.min()) and int(got_ids.max()) <
                                    exact_probs.shape[1]), f"{what}: expert id out of range"
    assert all(len(set(row)) == k for row in got_ids.tolist()), f"{what}: repeated expert"
    chosen = exact_probs.gather(1, got_ids.long())
    wanted = exact_probs.gather(1, exact_ids.long())
    close = ((chosen - wanted).abs() <= NEAR_TIE) | (chosen.isnan() & wanted.isnan())
    assert bool(close.all()), f"{what}: experts of lower probability chosen"
    assert torch.equal(got_ids[undefined], exact_ids[undefined].to(got_ids.dtype)), (
        f"{what}: rows without a defined softmax not routed to experts 0 .. k-1")


def check_topk_gating(backend, case):
    logits, grads = gating_inputs(case)
    expected = reference_gating(logits, case, grads, case["dtype"])
    exact = reference_gating(logits, case, grads, torch.float64)
    exact_probs = torch.softmax(plain(logits, torch.float64), dim=-1)
    undefined = ~torch.isfinite(torch.logsumexp(plain(logits, torch.float64), dim=-1))

    def call(b):
        return gating_outputs(lambda x, k, r: sk.topk_gating(x, k, renormalize=r, backend=b),
                              logits, case, grads)

    def check(b, got):
        what = f"topk_gating {b}"
        check_ids(got[1], exact_probs, exact[1], undefined, what)
        counts = torch.bincount(got[1].flatten().long(), minlength=case["experts"]).int()
        assert torch.equal(got[4], counts), f"{what}: tokens_per_expert"
        assert_close_to_float64(got[0], expected[0], exact[0], f"{what}: weights")
        # The losses and the gradient follow the choice; compared where it is the reference's.
        if torch.equal(got[1], exact[1]) and torch.equal(expected[1], exact[1]):
            names = ["load_balancing_loss", "z_loss", "grad"][:len(got) - 3]
            assert_all_close([got[2], got[3], *got[5:]], [expected[2], expected[3], *expected[5:]],
                             [exact[2], exact[3], *exact[5:]], names, what)

    run_backends("topk_gating", [backend], call, (logits,), check)


@pytest.mark.parametrize("backend", GATING_BACKENDS)
def test_topk_gating_valid(backend):
    dtypes = arithmetic_dtypes(backend, TOPK_GATING_BACKENDS[backend].dtypes)
    explore(gating_cases(dtypes), lambda case: check_topk_gating(backend, case),
            GATING_EXAMPLES[backend])


def gating_call(gen):
    return dict(logits=torch.randn(6, 4, generator=gen), k=2, renormalize=True, backend=None)


GATING_MUTATIONS = [
    *replacing("logits", NOT_TENSORS + [(lambda a: a["logits"].long(), TypeError),
                                        (lambda a: a["logits"].double(), TypeError),
                                        (lambda a: a["logits"][0], ValueError),
                                        (lambda a: a["logits"][None], ValueError),
                                        (lambda a: a["logits"][:, :0], ValueError)]),
    *replacing("k", BAD_INTS + [(0, ValueError), (5, ValueError)]),
    *replacing("renormalize", BAD_BOOLS),
    *replacing("backend", [(1, TypeError), ("cuda", ValueError)]),
]


def test_topk_gating_invalid():
    explore_invalid("topk_gating", gating_call, GATING_MUTATIONS,
                    lambda a: sk.topk_gating(a["logits"], a["k"], renormalize=a["renormalize"],
                                             backend=a["backend"]), 12)


# ----------------------------------------------------------------------------------------------
# moe_routing, and the plans the other ops take

ROUTING_BACKENDS = available(MOE_ROUTING_BACKENDS, torch.int32)
ROUTING_EXAMPLES = {"cuda": 30, "cpp": 60, "triton": 30, "reference": 60}


@st.composite
def routing_cases(draw):
    experts = draw(st.integers(1, 9))
    return dict(tokens=draw(st.integers(0, 20)), k=draw(st.integers(1, 3)), experts=experts,
                block_size=draw(st.integers(1, 8)), dtype=draw(st.sampled_from(INDEX_DTYPES)),
                layout=draw(layouts()), dim=draw(st.integers(0, 1)), seed=draw(seeds))


def random_plan(tokens, k, experts, block_size, gen):
    """A reference plan of random choices (repeated experts per token allowed)."""
    expert_ids = torch.randint(experts, (tokens, k), generator=gen, dtype=torch.int32)
    return moe_routing_reference(expert_ids.to(DEVICE), experts, block_size)


def check_moe_routing(backend, case):
    gen = generator(case["seed"])
    ids = torch.randint(case["experts"], (case["tokens"], case["k"]), generator=gen)
    expert_ids = with_layout(ids.to(case["dtype"]).to(DEVICE), case["layout"], case["dim"])
    expected = moe_routing_reference(plain(expert_ids), case["experts"], case["block_size"])
    run_backends("moe_routing", [backend],
                 lambda b: sk.moe_routing(expert_ids, case["experts"],
                                          block_size=case["block_size"], backend=b),
                 (expert_ids,),
                 lambda b, got: assert_bits(got, expected, expected._fields, f"moe_routing {b}"))


@pytest.mark.parametrize("backend", ROUTING_BACKENDS)
def test_moe_routing_valid(backend):
    explore(routing_cases(), lambda case: check_moe_routing(backend, case),
            ROUTING_EXAMPLES[backend])


def routing_call(gen):
    return dict(expert_ids=torch.randint(4, (5, 2), generator=gen), num_experts=4, block_size=4,
                backend=None)


ROUTING_MUTATIONS = [
    *replacing("expert_ids", NOT_TENSORS + [(lambda a: a["expert_ids"].float(), TypeError),
                                            (lambda a: a["expert_ids"][0], ValueError),
                                            (lambda a: a["expert_ids"][:, :0], ValueError),
                                            (lambda a: a["expert_ids"] + 4, ValueError),
                                            (lambda a: a["expert_ids"] - 4, ValueError)]),
    *replacing("num_experts", BAD_INTS + [(0, ValueError), (2**31, ValueError)]),
    *replacing("block_size", BAD_INTS + [(0, ValueError), (2**30, ValueError)]),
    *replacing("backend", [([], TypeError), ("flash_attn", ValueError)]),
]


def test_moe_routing_invalid():
    explore_invalid("moe_routing", routing_call, ROUTING_MUTATIONS,
                    lambda a: sk.moe_routing(a["expert_ids"], a["num_experts"],
                                             block_size=a["block_size"], backend=a["backend"]), 12)


# ----------------------------------------------------------------------------------------------
# moe_permute and moe_unpermute

PERMUTE_BACKENDS = available(MOE_PERMUTE_BACKENDS)
UNPERMUTE_BACKENDS = available(MOE_UNPERMUTE_BACKENDS)
PERMUTE_EXAMPLES = {"cpp": 60, "triton": 25, "reference": 60}


@st.composite
def permute_cases(draw, dtypes):
    experts = draw(st.integers(1, 6))
    return dict(tokens=draw(st.integers(0, 12)), k=draw(st.integers(1, min(3, experts))),
                experts=experts, block_size=draw(st.integers(1, 6)), width=draw(st.integers(1, 9)),
                dtype=draw(st.sampled_from(dtypes)), weights_dtype=draw(st.sampled_from(dtypes)),
                layout=draw(layouts()), dim=draw(st.integers(0, 1)),
                weights_layout=draw(layouts()), plan_layouts=draw(plan_layouts()),
                weights=draw(st.booleans()), special=draw(st.sampled_from((0, .1))),
                grad=draw(st.booleans()), seed=draw(seeds))


def check_moe_permute(backend, case):
    gen = generator(case["seed"])
    plan = random_plan(case["tokens"], case["k"], case["experts"], case["block_size"], gen)
    x = with_layout(random_floats((case["tokens"], case["width"]), case["dtype"], gen,
                                  special=case["special"]), case["layout"], case["dim"],
                    requires_grad=case["grad"])
    grad = random_floats((plan.num_padded_rows, case["width"]), case["dtype"], gen)
    views = with_plan_layouts(plan, case["plan_layouts"])

    def reference(dtype):
        inputs = [plain(x, dtype, requires_grad=case["grad"])]
        out = moe_permute_reference(inputs[0], plan.position, plan.row_to_pair)
        return [out.detach(), *(gradients([out], inputs, [grad.to(dtype)]) if case["grad"]
                                else [])]

    expected, exact = reference(case["dtype"]), reference(torch.float64)

    def call(b):
        out = sk.moe_permute(x, views, backend=b)
        return [out.detach(), *(gradients([out], [x], [grad]) if case["grad"] else [])]

    def check(b, got):
        assert_bits(got[:1], expected[:1], ["out"], f"moe_permute {b}")
        assert_all_close(got[1:], expected[1:], exact[1:], ["grad x"][:len(got) - 1],
                         f"moe_permute {b}")

    run_backends("moe_permute", [backend], call, (x, views), check)


@pytest.mark.parametrize("backend", PERMUTE_BACKENDS)
def test_moe_permute_valid(backend):
    dtypes = arithmetic_dtypes(backend, MOE_PERMUTE_BACKENDS[backend].dtypes)
    explore(permute_cases(dtypes), lambda case: check_moe_permute(backend, case),
            PERMUTE_EXAMPLES[backend])


def check_moe_unpermute(backend, case):
    gen = generator(case["seed"])
    plan = random_plan(case["tokens"], case["k"], case["experts"], case["block_size"], gen)
    rows = random_floats((plan.num_padded_rows, case["width"]), case["dtype"], gen,
                         special=case["special"])
    rows[plan.row_to_pair < 0] = float("nan")  # padding rows are never read
    y = with_layout(rows, case["layout"], case["dim"], requires_grad=case["grad"])
    weights = None
    if case["weights"]:
        weights = with_layout(torch.rand(case["tokens"], case["k"], generator=gen).to(
            case["weights_dtype"]).to(DEVICE), case["weights_layout"], requires_grad=case["grad"])
    grad = random_floats((case["tokens"], case["width"]), case["dtype"], gen)
    views = with_plan_layouts(plan, case["plan_layouts"])
    differentiable = [t for t in (y, weights) if t is not None and case["grad"]]

    def reference(exactly):
        """In the inputs' dtypes, or everything in float64 (``exactly``)."""
        dtype = torch.float64 if exactly else case["dtype"]
        y_ref = plain(y, dtype, requires_grad=case["grad"])
        w_ref = None if weights is None else plain(
            weights, torch.float64 if exactly else weights.dtype, requires_grad=case["grad"])
        out = moe_unpermute_reference(y_ref, plan.position, plan.row_to_pair, w_ref)
        inputs = [t for t in (y_ref, w_ref) if t is not None and case["grad"]]
        return [out.detach(), *gradients([out], inputs, [grad.to(dtype)])]

    expected, exact = reference(False), reference(True)

    def call(b):
        out = sk.moe_unpermute(y, views, weights, backend=b)
        return [out.detach(), *gradients([out], differentiable, [grad])]

    def check(b, got):
        names = ["out", "grad y_grouped", "grad weights"][:len(got)]
        assert_all_close(got, expected, exact, names, f"moe_unpermute {b}")

    run_backends("moe_unpermute", [backend], call, (y, views, weights), check)


@pytest.mark.parametrize("backend", UNPERMUTE_BACKENDS)
def test_moe_unpermute_valid(backend):
    dtypes = arithmetic_dtypes(backend, MOE_UNPERMUTE_BACKENDS[backend].dtypes)
    explore(permute_cases(dtypes), lambda case: check_moe_unpermute(backend, case),
            PERMUTE_EXAMPLES[backend])


def permute_call(gen):
    plan = sk.moe_routing(torch.tensor([[0, 1], [3, 2], [1, 0]], dtype=torch.int32), 4,
                          block_size=4)
    return dict(x=torch.randn(3, 5, generator=gen), plan=plan, backend=None,
                y_grouped=torch.randn(plan.num_padded_rows, 5, generator=gen),
                weights=torch.rand(3, 2, generator=gen))


def _plan(field, make, error):
    def mutate(args):
        args["plan"] = args["plan"]._replace(**{field: make(getattr(args["plan"], field))})
    return (f"plan.{field}", mutate, error, f"plan.{field}")


PLAN_MUTATIONS = [
    *replacing("plan", [(lambda a: tuple(a["plan"]), TypeError), (None, TypeError)]),
    _plan("position", lambda t: t.long(), TypeError),
    _plan("position", lambda t: t + 100, ValueError),
    _plan("position", lambda t: t - 100, ValueError),
    _plan("position", lambda t: t.view(-1), ValueError),
    _plan("row_to_pair", lambda t: t + 100, ValueError),
    _plan("row_to_pair", lambda t: t - 100, ValueError),
    _plan("row_to_pair", lambda t: t.to(META), ValueError),
    _plan("row_to_pair", lambda t: None, TypeError),
    *replacing("backend", [(2, TypeError), ("cuda", ValueError)]),
]
PERMUTE_MUTATIONS = PLAN_MUTATIONS + [
    *replacing("x", NOT_TENSORS + [(lambda a: a["x"].int(), TypeError),
                                   (lambda a: a["x"][0], ValueError),
                                   (lambda a: a["x"][:2], ValueError)]),
]
UNPERMUTE_MUTATIONS = PLAN_MUTATIONS + [
    *replacing("y_grouped", NOT_TENSORS + [(lambda a: a["y_grouped"].int(), TypeError),
                                           (lambda a: a["y_grouped"][1:], ValueError),
                                           (lambda a: a["y_grouped"][None], ValueError)]),
    *replacing("weights", NOT_TENSORS[1:] + [(lambda a: a["weights"].int(), TypeError),
                                             (lambda a: a["weights"][:, :1], ValueError),
                                             (lambda a: a["weights"][0], ValueError),
                                             (lambda a: a["weights"].to(META), ValueError)]),
]


def test_moe_permute_invalid():
    explore_invalid("moe_permute", permute_call, PERMUTE_MUTATIONS,
                    lambda a: sk.moe_permute(a["x"], a["plan"], backend=a["backend"]), 12)


def test_moe_unpermute_invalid():
    explore_invalid("moe_unpermute", permute_call, UNPERMUTE_MUTATIONS,
                    lambda a: sk.moe_unpermute(a["y_grouped"], a["plan"], a["weights"],
                                               backend=a["backend"]), 10)


# ----------------------------------------------------------------------------------------------
# moe_expert_mlp

MLP_BACKENDS = available(MOE_EXPERT_MLP_BACKENDS)
MLP_EXAMPLES = {"cpp": 40, "triton": 9, "reference": 40}


@st.composite
def mlp_cases(draw, dtypes):
    experts = draw(st.integers(1, 4))
    return dict(tokens=draw(st.integers(0, 8)), k=draw(st.integers(1, min(2, experts))),
                experts=experts, hidden=draw(st.integers(1, 10)), ffn=draw(st.integers(1, 10)),
                block_size=draw(st.integers(1, 8)), recompute=draw(st.booleans()),
                dtype=draw(st.sampled_from(dtypes)), layout=draw(layouts()),
                weight_layouts=[draw(layouts()) for _ in "132"],
                weight_dims=[draw(st.integers(0, 1)) for _ in "132"],
                plan_layouts=draw(plan_layouts()), poison=draw(st.sampled_from((None, 0, 1, 2))),
                seed=draw(seeds))


def mlp_inputs(case):
    gen = generator(case["seed"])
    plan = random_plan(case["tokens"], case["k"], case["experts"], case["block_size"], gen)
    dtype, hidden, ffn, experts = case["dtype"], case["hidden"], case["ffn"], case["experts"]
    x = random_floats((plan.num_padded_rows, hidden), dtype, gen)
    x[plan.row_to_pair < 0] = float("nan")  # padding rows are never read
    weights = [random_floats((experts, *shape), dtype, gen, scale=fan_in ** -0.5)
               for shape, fan_in in (((ffn, hidden), hidden), ((ffn, hidden), hidden),
                                     ((hidden, ffn), ffn))]
    if case["poison"] is not None:  # a NaN and an inf in the last expert's weights
        weights[case["poison"]][-1, 0, 0] = float("nan")
        weights[case["poison"]][-1, -1, -1] = float("inf")
    x = with_layout(x, case["layout"], requires_grad=True)
    weights = [with_layout(w, layout, dim, requires_grad=True)
               for w, layout, dim in zip(weights, case["weight_layouts"], case["weight_dims"])]
    grad = random_floats(x.shape, dtype, gen)
    return plan, x, weights, grad


def check_moe_expert_mlp(backend, case):
    plan, x, weights, grad = mlp_inputs(case)
    views = with_plan_layouts(plan, case["plan_layouts"])

    def reference(dtype):
        inputs = [plain(t, dtype, requires_grad=True) for t in (x, *weights)]
        y, _, _ = moe_expert_mlp_reference(*inputs, plan.tokens_per_expert, plan.padded_offsets,
                                           store_pre=False)
        return [y.detach(), *gradients([y], inputs, [grad.to(dtype)])]

    expected, exact = reference(case["dtype"]), reference(torch.float64)

    def call(b):
        y = sk.moe_expert_mlp(x, *weights, views, recompute=case["recompute"], backend=b)
        return [y.detach(), *gradients([y], [x, *weights], [grad])]

    def check(b, got):
        assert_all_close(got, expected, exact, ["y", "grad x", "grad w1", "grad w3", "grad w2"],
                         f"moe_expert_mlp {b}")

    run_backends("moe_expert_mlp", [backend], call, (x, weights, views), check)


@pytest.mark.parametrize("backend", MLP_BACKENDS)
def test_moe_expert_mlp_valid(backend):
    dtypes = arithmetic_dtypes(backend, MOE_EXPERT_MLP_BACKENDS[backend].dtypes)
    explore(mlp_cases(dtypes), lambda case: check_moe_expert_mlp(backend, case),
            MLP_EXAMPLES[backend])


def mlp_call(gen):
    plan = sk.moe_routing(torch.tensor([[0, 1], [2, 1], [1, 0]], dtype=torch.int32), 3,
                          block_size=4)
    return dict(x_grouped=torch.randn(plan.num_padded_rows, 5, generator=gen),
                w1=torch.randn(3, 7, 5, generator=gen), w3=torch.randn(3, 7, 5, generator=gen),
                w2=torch.randn(3, 5, 7, generator=gen), plan=plan, recompute=False, backend=None)


MLP_MUTATIONS = [m for m in PLAN_MUTATIONS if m[0] != "plan.row_to_pair" or m[2] is TypeError] + [
    _plan("tokens_per_expert", lambda t: t.long(), TypeError),
    _plan("tokens_per_expert", lambda t: t - 9, ValueError),
    _plan("padded_offsets", lambda t: t[:-1], ValueError),
    _plan("padded_offsets", lambda t: t * 2, ValueError),
    _plan("padded_offsets", lambda t: t.to(META), ValueError),
    *replacing("x_grouped", NOT_TENSORS + [(lambda a: a["x_grouped"].int(), TypeError),
                                           (lambda a: a["x_grouped"][1:], ValueError),
                                           (lambda a: a["x_grouped"][None], ValueError)]),
    *replacing("w1", NOT_TENSORS + [(lambda a: a["w1"].double(), TypeError),
                                    (lambda a: a["w1"][:, :6], ValueError),
                                    (lambda a: a["w1"][0], ValueError)]),
    *replacing("w3", [(lambda a: a["w3"][:2], ValueError), (lambda a: a["w3"].to(META),
                                                            ValueError)]),
    *replacing("w2", [(lambda a: a["w2"].transpose(1, 2), ValueError), (None, TypeError)]),
    *replacing("recompute", BAD_BOOLS),
]


def test_moe_expert_mlp_invalid():
    explore_invalid("moe_expert_mlp", mlp_call, MLP_MUTATIONS,
                    lambda a: sk.moe_expert_mlp(a["x_grouped"], a["w1"], a["w3"], a["w2"],
                                                a["plan"], recompute=a["recompute"],
                                                backend=a["backend"]), 8)


@pytest.mark.parametrize("mutations,call", [
    (GATING_MUTATIONS, gating_call), (ROUTING_MUTATIONS, routing_call),
    (PERMUTE_MUTATIONS, lambda g: {k: v for k, v in permute_call(g).items()
                                   if k in ("x", "plan", "backend")}),
    (UNPERMUTE_MUTATIONS, lambda g: {k: v for k, v in permute_call(g).items() if k != "x"}),
    (MLP_MUTATIONS, mlp_call)])
def test_every_argument_has_invalid_cases(mutations, call):
    """A new argument of an op above gets its invalid cases here."""
    named = {name.split(".")[0] for _, _, _, name in mutations}
    assert not set(call(generator(0))) - named
