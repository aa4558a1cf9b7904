"""Fuzzing patch_projection on every backend that runs here: random valid encoders (token layouts
with and without a CLS token, maps pooled or repeated per axis, zero views, odd widths), every
layout of every tensor argument, NaN / inf, bias / LayerNorm / rows written into a packed sequence,
against the reference and float64 math (output and every gradient), inputs never modified; every
class of invalid input, expecting a TypeError / ValueError naming the argument."""
from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st

import sphinx_kernels as sk
from sphinx_kernels.ops.patch_projection import (
    PATCH_PROJECTION_BACKENDS,
    patch_projection_reference,
)
from tests.fuzz.harness import (
    BAD_FLOATS,
    DEVICE,
    FLOAT_DTYPES,
    NOT_TENSORS,
    assert_all_close,
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

BACKENDS = PATCH_PROJECTION_BACKENDS.available(
    PATCH_PROJECTION_BACKENDS.request(DEVICE, torch.float32))
EXAMPLES = {"triton": 20, "reference": 40}
PARAMETERS = ("bias", "norm_weight", "norm_bias")
META = torch.device("meta")


@st.composite
def encoders(draw, grid):
    """One encoder's kind, source grid and channels for ``grid``."""
    kind = draw(st.sampled_from(("tokens", "tokens_cls", "map")))
    def side(g, per_axis_scale):
        options = [g, 2 * g] + ([g // 2] if g % 2 == 0 else [])
        return draw(st.sampled_from(options)) if per_axis_scale else options
    if kind == "map":
        height, width = side(grid[0], True), side(grid[1], True)
    else:  # one scale for both axes
        scale = draw(st.sampled_from([1, 2] + ([0.5] if grid[0] % 2 == grid[1] % 2 == 0 else [])))
        height, width = int(grid[0] * scale), int(grid[1] * scale)
    return dict(kind=kind, height=height, width=width, channels=draw(st.integers(1, 5)),
                layout=draw(layouts()), dim=draw(st.integers(0, 2)))


@st.composite
def projection_cases(draw, dtypes, out=None, rows_layouts=("contiguous",)):
    """Cases of patch_projection; ``out``: force rows into a packed sequence (True) or not (False).
    A strided out_rows once made the Triton kernel write out of bounds: such layouts are fuzzed in
    a fresh interpreter (tests/fuzz/risky.py)."""
    grid = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    norm = draw(st.booleans())
    weight_layout, weight_dim = draw(layouts()), draw(st.integers(0, 1))
    if norm and weight_layout == "expanded":
        # Not one row for every output column: a LayerNorm of (nearly) equal values divides
        # rounding noise by their ~0 deviation, on every backend differently.
        weight_dim = 1
    return dict(views=draw(st.integers(0, 3)), grid=grid,
                square=grid[0] == grid[1] and draw(st.booleans()),
                encoders=draw(st.lists(encoders(grid), min_size=1, max_size=2)),
                width=draw(st.integers(1, 9)), dtype=draw(st.sampled_from(dtypes)),
                bias=draw(st.booleans()), norm=norm, norm_bias=norm and draw(st.booleans()),
                out=draw(st.booleans()) if out is None else out,
                extra_rows=draw(st.integers(0, 3)),
                index_dtype=draw(st.sampled_from((torch.int32, torch.int64))),
                weight_layout=weight_layout, weight_dim=weight_dim,
                parameter_layouts=[draw(layouts(("contiguous", "offset", "strided", "expanded")))
                                   for _ in PARAMETERS],
                out_layout=draw(layouts(("contiguous", "offset", "strided", "transposed"))),
                rows_layout=draw(layouts(rows_layouts)),
                special=draw(st.sampled_from((0, 0, .05))), eps=draw(st.sampled_from((1e-5, 0.5))),
                seed=draw(seeds))


def projection_inputs(case):
    """(features, weight, keyword arguments, the tensors that get gradients, output gradient)."""
    gen = generator(case["seed"])
    dtype, views, special = case["dtype"], case["views"], case["special"]
    features = []
    for e in case["encoders"]:
        if e["kind"] == "map":
            shape = (views, e["channels"], e["height"], e["width"])
        else:
            shape = (views, int(e["kind"] == "tokens_cls") + e["height"] * e["width"],
                     e["channels"])
        values = random_floats(shape, dtype, gen, special=special)
        features.append(with_layout(values, e["layout"], e["dim"], requires_grad=True))
    in_features = sum(e["channels"] for e in case["encoders"])
    weight = with_layout(random_floats((case["width"], in_features), dtype, gen,
                                       scale=in_features ** -0.5, special=special),
                         case["weight_layout"], case["weight_dim"], requires_grad=True)
    kwargs = dict(grid=case["grid"][0] if case["square"] else case["grid"], eps=case["eps"])
    wanted = [name for name, on in zip(PARAMETERS, (case["bias"], case["norm"], case["norm_bias"]))
              if on]
    for name, layout in zip(PARAMETERS, case["parameter_layouts"]):
        if name in wanted:
            offset = 1.0 if name == "norm_weight" else 0.0
            kwargs[name] = with_layout(random_floats((case["width"],), dtype, gen) * 0.1 + offset,
                                       layout, requires_grad=True)
    rows = views * (1 + case["grid"][0] * case["grid"][1])
    if case["out"]:
        total = rows + case["extra_rows"]
        kwargs["out"] = with_layout(random_floats((total, case["width"]), dtype, gen),
                                    case["out_layout"], requires_grad=True)
        out_rows = torch.randperm(total, generator=gen)[:rows].to(case["index_dtype"]).to(DEVICE)
        kwargs["out_rows"] = with_layout(out_rows, case["rows_layout"])
    differentiable = [*features, weight] + [kwargs[k] for k in (*PARAMETERS, "out") if k in kwargs]
    grad_rows = total if case["out"] else rows
    return features, weight, kwargs, differentiable, random_floats((grad_rows, case["width"]),
                                                                   dtype, gen)


def check_patch_projection(backend, case):
    features, weight, kwargs, differentiable, grad = projection_inputs(case)
    names = ([f"grad features[{i}]" for i in range(len(features))] + ["grad weight"]
             + [f"grad {k}" for k in (*PARAMETERS, "out") if k in kwargs])

    def reference(dtype):
        copies = [plain(t, dtype, requires_grad=True) for t in differentiable]
        it = iter(copies)
        fs, w = [next(it) for _ in features], next(it)
        kw = {k: (next(it) if k in (*PARAMETERS, "out") else v) for k, v in kwargs.items()}
        if "out_rows" in kw:
            kw["out_rows"] = plain(kwargs["out_rows"])
        y = patch_projection_reference(fs, w, kw.pop("bias", None), **kw)
        return [y.detach(), *gradients([y], copies, [grad.to(dtype)])]

    expected, exact = reference(case["dtype"]), reference(torch.float64)

    def call(b):
        y = sk.patch_projection(features, weight, kwargs.get("bias"), backend=b,
                                **{k: v for k, v in kwargs.items() if k != "bias"})
        return [y.detach(), *gradients([y], differentiable, [grad])]

    def check(b, got):
        assert_all_close(got, expected, exact, ["out"] + names, f"patch_projection {b}")

    run_backends("patch_projection", [backend], call, (features, weight, kwargs), check)


def dtypes_of(backend):
    return FLOAT_DTYPES if backend == "triton" else FLOAT_DTYPES + (torch.float64,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_projection_valid(backend):
    explore(projection_cases(dtypes_of(backend)),
            lambda case: check_patch_projection(backend, case), EXAMPLES[backend])


def projection_call(gen):
    features = [torch.randn(2, 5, 3, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)]
    return dict(features=features, weight=torch.randn(6, 7, generator=gen), bias=None, grid=2,
                norm_weight=None, norm_bias=None, eps=1e-5, out=torch.randn(12, 6, generator=gen),
                out_rows=torch.randperm(12, generator=gen)[:10], backend=None)


def _feature(i, make):
    def mutate(args):
        args["features"] = list(args["features"])
        args["features"][i] = make(args["features"][i])
    return mutate


MUTATIONS = [
    *replacing("features", [(lambda a: a["features"][0], TypeError), (None, TypeError),
                            ([], ValueError)]),
    ("features[1] not a tensor", _feature(1, lambda f: None), TypeError, "features[1]"),
    ("features[1] 2-D", _feature(1, lambda f: f[0, 0]), ValueError, "features[1]"),
    ("features[0] float64", _feature(0, lambda f: f.double()), TypeError, "features[0]"),
    ("features[1] int", _feature(1, lambda f: f.long()), TypeError, "features[1]"),
    ("features[1] on meta", _feature(1, lambda f: f.to(META)), ValueError, "features[1]"),
    ("features[1] views", _feature(1, lambda f: f[:1]), ValueError, "features[1]"),
    ("features[0] tokens", _feature(0, lambda f: f[:, :3]), ValueError, "features[0]"),
    ("features[1] grid", _feature(1, lambda f: f[:, :, :3, :3]), ValueError, "features[1]"),
    *replacing("features", [(lambda a: [f[:1].expand(2**30, *f.shape[1:]) for f in a["features"]],
                             ValueError)]),  # 2^30 views of 5 rows: past int32 row indices
    *replacing("weight", NOT_TENSORS + [(lambda a: a["weight"].long(), TypeError),
                                        (lambda a: a["weight"][0], ValueError),
                                        (lambda a: a["weight"][:, :6], ValueError),
                                        (lambda a: a["weight"][:0], ValueError)]),
    *replacing("bias", [(torch.zeros(5), ValueError), (torch.zeros(6).double(), TypeError),
                        (torch.zeros(1, 6), ValueError), (torch.zeros(6, device=META),
                                                          ValueError), ("b", TypeError)]),
    *replacing("norm_weight", [(torch.zeros(7), ValueError), (torch.zeros(6).half(), TypeError)]),
    *replacing("norm_bias", [(torch.zeros(6), ValueError)]),
    *replacing("grid", [(3, ValueError), (0, ValueError), ((2, 0), ValueError),
                        ((2, 2, 2), ValueError), (2.0, TypeError), (True, TypeError),
                        ((2, True), TypeError), ("2", TypeError), (None, TypeError),
                        (2**40, ValueError), ((2**20, 2**20), ValueError)]),
    *replacing("eps", BAD_FLOATS + [(-1.0, ValueError), (None, TypeError)]),
    *replacing("out", [(None, ValueError), (lambda a: a["out"][:, :5], ValueError),
                       (lambda a: a["out"].double(), TypeError), (lambda a: a["out"][0],
                                                                  ValueError)]),
    *replacing("out_rows", [(None, ValueError), (lambda a: a["out_rows"].float(), TypeError),
                            (lambda a: a["out_rows"][:-1], ValueError),
                            (lambda a: a["out_rows"] + 12, ValueError),
                            (lambda a: a["out_rows"] - 12, ValueError),
                            (lambda a: a["out_rows"] * 0, ValueError),
                            (lambda a: a["out_rows"].to(META), ValueError)]),
    *replacing("backend", [(2, TypeError), ("cpp", ValueError)]),
]


def test_patch_projection_invalid():
    def call(a):
        return sk.patch_projection(a.pop("features"), a.pop("weight"), a.pop("bias"), **a)
    explore_invalid("patch_projection", projection_call, MUTATIONS, call, 8)


def test_every_argument_has_invalid_cases():
    named = {name.split("[")[0] for _, _, _, name in MUTATIONS}
    assert not set(projection_call(generator(0))) - named
