"""patch_projection on every backend this machine can run: output and every gradient within the
tolerance of a float64 reference over a sample of the acceptance grid (pooled and repeated maps,
token layouts with and without a CLS token, bias, LayerNorm, rows scattered into a packed sequence),
strided inputs read in place, bad inputs, opcheck and torch.compile. The nn module:
test_patch_projector.py."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sphinx_kernels
from sphinx_kernels.ops.patch_projection import (
    PATCH_PROJECTION_BACKENDS,
    FeatureLayout,
    feature_layouts,
    patch_projection_reference,
)
from tests.numerics import FORWARD_FACTOR, GRADIENT_FACTOR, assert_all_within_torch_error
from tests.variants import expanded, run_isolated, same_bits, strided

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = PATCH_PROJECTION_BACKENDS.available(
    PATCH_PROJECTION_BACKENDS.request(DEVICE, torch.float32))


@dataclass(frozen=True)
class Encoder:
    """One encoder of a test case: a token layout (with ``cls`` or not) or a map, its source
    grid."""

    tokens: bool
    cls: bool
    side: int      # the source grid is side x side
    channels: int

    def shape(self, views: int) -> tuple[int, ...]:
        if self.tokens:
            return views, int(self.cls) + self.side * self.side, self.channels
        return views, self.channels, self.side, self.side


@dataclass(frozen=True)
class Case:
    views: int
    grid: int
    encoders: tuple[Encoder, ...]
    width: int
    bias: bool
    norm: bool
    out: bool

    def __str__(self):
        enc = "+".join(f"{'tok' + ('cls' if e.cls else '') if e.tokens else 'map'}{e.side}c"
                       f"{e.channels}" for e in self.encoders)
        flags = "".join(f for f, on in (("b", self.bias), ("n", self.norm), ("o", self.out)) if on)
        return f"V{self.views}-g{self.grid}-{enc}-D{self.width}-{flags or 'plain'}"


def sample_cases(count: int, seed: int) -> list[Case]:
    """``count`` cases from the acceptance grid: V in {1, 3, 8}, C_i in {1, 48, 100, 192}, 4x4 grids
    pooled to 2x2 or 2x2 grids repeated to 4x4 (or equal to it), each encoder a map or tokens with
    or without a CLS token, with and without bias, norm and out_rows. The grid is too large to run
    whole under the interpreter; a fixed seed keeps the test ids stable (the data comes from each
    test's seed)."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        grid = rng.choice([2, 4])
        other = 4 if grid == 2 else 2  # 4x4 pooled to 2x2, or 2x2 repeated to 4x4
        encoders = tuple(
            Encoder(tokens=kind != "map", cls=kind == "tokens+cls",
                    side=other if kind == "map" else rng.choice([grid, other]),
                    channels=rng.choice([1, 48, 100, 192]))
            for kind in (rng.choice(["tokens", "tokens+cls"]), rng.choice(["map", "tokens+cls"])))
        norm = rng.random() < 0.5
        cases.append(Case(rng.choice([1, 3, 8]), grid, encoders, rng.choice([16, 37, 64]),
                          rng.random() < 0.5, norm, rng.random() < 0.5))
    return cases


def make_inputs(case: Case, dtype: torch.dtype, gen: torch.Generator, requires_grad=True):
    """Random float64 inputs rounded to ``dtype``: (features, weight, kwargs of the op)."""
    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)

    # Features with a per-channel offset, as encoder outputs have: the global (mean) rows are then
    # not near zero, which would make LayerNorm rows of few channels ill-conditioned.
    features = [(rand(*e.shape(case.views)).double()
                 + rand(e.channels).double().view(-1, *[1] * (2 if not e.tokens else 0))
                 ).to(dtype) for e in case.encoders]
    in_features = sum(e.channels for e in case.encoders)
    weight = rand(case.width, in_features, scale=in_features ** -0.5)
    kwargs = {"grid": case.grid}
    if case.bias:
        kwargs["bias"] = rand(case.width)
    if case.norm:
        kwargs["norm_weight"] = 1 + rand(case.width, scale=0.1)
        kwargs["norm_bias"] = rand(case.width, scale=0.1)
    if case.out:
        rows = case.views * (1 + case.grid ** 2)
        total = rows + 5  # rows that the projection does not own keep out's values
        kwargs["out"] = rand(total, case.width)
        kwargs["out_rows"] = torch.randperm(total, generator=gen)[:rows].to(DEVICE)
    tensors = [*features, weight] + [kwargs[k] for k in ("bias", "norm_weight", "norm_bias", "out")
                                     if k in kwargs]
    for t in tensors:
        t.requires_grad_(requires_grad)
    return features, weight, kwargs, tensors


def run(fn, features, weight, kwargs, tensors, grad_out):
    """The output and the gradient of every input tensor, for output gradient ``grad_out``."""
    for t in tensors:
        t.grad = None
    y = fn(features, weight, **kwargs)
    y.backward(grad_out)
    return y.detach(), [t.grad for t in tensors]


def as_float64(features, weight, kwargs):
    def convert(t):
        return t.detach().double().requires_grad_(t.requires_grad)
    kwargs64 = {k: convert(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in kwargs.items()}
    features64 = [convert(f) for f in features]
    weight64 = convert(weight)
    tensors64 = [*features64, weight64] + [kwargs64[k] for k in ("bias", "norm_weight", "norm_bias",
                                                                   "out") if k in kwargs64]
    return features64, weight64, kwargs64, tensors64


def reference_pairs(draw, gen, case, dtype, inputs=None):
    """(same dtype, float64) pairs of the reference's output and every gradient, on ``inputs`` (one
    ``draw(gen)``) and a fresh output gradient: PyTorch's own error."""
    features, weight, kwargs, tensors = inputs or draw(gen)
    grad_out = torch.randn(output_rows(case, kwargs), case.width, generator=gen,
                           dtype=torch.float64).to(DEVICE)
    same = run(patch_projection_reference, features, weight, kwargs, tensors, grad_out.to(dtype))
    exact = run(patch_projection_reference, *as_float64(features, weight, kwargs), grad_out)
    return list(zip([same[0], *same[1]], [exact[0], *exact[1]])), grad_out


def output_rows(case, kwargs):
    return kwargs["out"].shape[0] if case.out else case.views * (1 + case.grid ** 2)


def check_against_float64(backend, case, dtype, draw, seed):
    """The output and every gradient against the float64 reference, judged by PyTorch's own error in
    ``dtype`` (tests/numerics.py: over fresh draws of inputs, ``draw(generator)``, where a case has
    few values: V = 1, C = 1 gives 5 gradient values)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = draw(gen)
    features, weight, kwargs, tensors = inputs
    first, grad_out = reference_pairs(draw, gen, case, dtype, inputs)
    actual, grads = run(lambda f, w, **kw: sphinx_kernels.patch_projection(f, w, backend=backend,
                                                                           **kw),
                        features, weight, kwargs, tensors, grad_out.to(dtype))
    names = ["output"] + [f"grad of features[{i}]" for i in range(len(features))] + [
        "grad of weight"] + [f"grad of {k}" for k in ("bias", "norm_weight", "norm_bias", "out")
                             if k in kwargs]
    for name, result in zip(names, [actual, *grads]):
        assert result.dtype == dtype, name
    assert_all_within_torch_error(
        [actual, *grads], [exact for _, exact in first],
        lambda g: reference_pairs(draw, g, case, dtype)[0], gen,
        [FORWARD_FACTOR] + [GRADIENT_FACTOR] * len(grads), names, backend, first=first)
    if case.out:  # rows not written keep out exactly; their gradient passes through exactly
        kept = torch.ones(output_rows(case, kwargs), dtype=torch.bool, device=DEVICE)
        kept[kwargs["out_rows"]] = False
        assert torch.equal(actual[kept], kwargs["out"].detach()[kept])
        assert torch.equal(grads[-1][kept], grad_out.to(dtype)[kept])
        assert not grads[-1][~kept].any()


# The sample, and a LayerNorm over 2 input channels: its rows span a plane, so the normalisation's
# scale invariance makes their gradients a cancelling dot product, the hardest case for its error.
CASES = sample_cases(12, seed=5) + [
    Case(1, 2, (Encoder(True, True, 2, 1), Encoder(False, False, 4, 1)), 16, True, True, False)]


def features_of(cases: list[Case]) -> set[tuple]:
    """The acceptance-grid values a list of cases exercises."""
    found = set()
    for case in cases:
        found |= {("V", case.views), ("bias", case.bias), ("norm", case.norm), ("out", case.out)}
        for e in case.encoders:
            kind = ("tokens+cls" if e.cls else "tokens") if e.tokens else "map"
            resample = "pool" if e.side > case.grid else "repeat" if e.side < case.grid else "same"
            found |= {("C", e.channels), (kind, resample)}
    return found


def test_the_sample_covers_the_acceptance_grid():
    expected = {("V", v) for v in (1, 3, 8)} | {("C", c) for c in (1, 48, 100, 192)}
    expected |= {(flag, on) for flag in ("bias", "norm", "out") for on in (False, True)}
    expected |= {(kind, resample) for kind in ("tokens", "tokens+cls")
                 for resample in ("pool", "repeat", "same")}
    expected |= {("map", "pool"), ("map", "repeat")}
    assert features_of(CASES) >= expected, expected - features_of(CASES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_output_and_gradients_within_tolerance_of_float64(backend, dtype, case, seed):
    check_against_float64(backend, case, dtype, lambda gen: make_inputs(case, dtype, gen), seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_features_are_read_in_place(backend, seed):
    """A channels-last map, tokens sliced out of a wider buffer and an expanded (stride-0) map."""
    case = Case(3, 2, (Encoder(True, True, 4, 7), Encoder(False, False, 4, 5),
                       Encoder(False, False, 1, 3)), 19, True, True, False)

    def draw(gen):
        _, weight, kwargs, _ = make_inputs(case, torch.float32, gen)
        tokens = torch.randn(3, 17, 20, generator=gen)[:, :, 4:11].to(DEVICE)
        channels_last = torch.randn(3, 5, 4, 4, generator=gen).to(DEVICE).to(
            memory_format=torch.channels_last)
        expanded = torch.randn(1, 3, 1, 1, generator=gen).to(DEVICE).expand(3, 3, 1, 1).detach()
        assert not tokens.is_contiguous() and not channels_last.is_contiguous()
        features = [t.requires_grad_() for t in (tokens, channels_last, expanded)]
        return features, weight, kwargs, [*features, weight, *(kwargs[k] for k in (
            "bias", "norm_weight", "norm_bias"))]

    check_against_float64(backend, case, torch.float32, draw, seed)


def outputs_and_gradients(backend, features, weight, kwargs, grad_seed=0):
    """The op's output and the gradient of every tensor argument that requires grad (views
    included: ``torch.autograd.grad``)."""
    y = sphinx_kernels.patch_projection(features, weight, backend=backend, **kwargs)
    inputs = [t for t in (*features, weight, *kwargs.values())
              if isinstance(t, torch.Tensor) and t.requires_grad]
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y)
    return [y.detach(), *torch.autograd.grad(y, inputs, grad)]


PARAMETERS = ("bias", "norm_weight", "norm_bias")


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_of_any_strides(backend, seed):
    """bias, norm_weight and norm_bias as strided views (NaN in the gaps) and expanded (stride 0):
    the output and every gradient of contiguous copies, bit for bit (the Triton kernels once read
    them as contiguous)."""
    case = Case(2, 2, (Encoder(True, True, 4, 5), Encoder(False, False, 2, 3)), 11, True, True,
                False)
    features, weight, kwargs, _ = make_inputs(case, torch.float32,
                                              torch.Generator().manual_seed(seed))
    expected = outputs_and_gradients(backend, features, weight, kwargs)
    views = dict(kwargs, **{name: strided(kwargs[name]) for name in PARAMETERS})
    got = outputs_and_gradients(backend, features, weight, views)
    assert all(same_bits(a, b) for a, b in zip(got, expected))
    shared = dict(kwargs, **{name: expanded(kwargs[name][:1].detach().requires_grad_(), (11,))
                             for name in PARAMETERS})
    copies = dict(shared, **{name: shared[name].detach().contiguous().requires_grad_()
                             for name in PARAMETERS})
    got = outputs_and_gradients(backend, features, weight, shared)
    assert all(same_bits(a, b) for a, b in zip(got, outputs_and_gradients(backend, features,
                                                                           weight, copies)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_and_int64_out_rows(backend, seed):
    """out_rows of either index dtype on every backend (the reference once refused int32)."""
    case = Case(2, 2, (Encoder(True, True, 4, 5),), 11, True, False, True)
    features, weight, kwargs, _ = make_inputs(case, torch.float32,
                                              torch.Generator().manual_seed(seed))
    expected = outputs_and_gradients(backend, features, weight, kwargs)
    got = outputs_and_gradients(backend, features, weight,
                                dict(kwargs, out_rows=kwargs["out_rows"].int()))
    assert all(same_bits(a, b) for a, b in zip(got, expected))


def check_out_rows_of_any_strides():
    """Run by :func:`test_out_rows_of_any_strides` in a fresh interpreter: a strided out_rows once
    made the Triton kernels write out of bounds (a segmentation fault)."""
    for backend in BACKENDS:
        for norm in (False, True):
            case = Case(2, 2, (Encoder(True, True, 4, 5),), 11, True, norm, True)
            features, weight, kwargs, _ = make_inputs(case, torch.float32,
                                                      torch.Generator().manual_seed(1))
            expected = outputs_and_gradients(backend, features, weight, kwargs)
            for rows in (strided(kwargs["out_rows"]), strided(kwargs["out_rows"].int())):
                got = outputs_and_gradients(backend, features, weight, dict(kwargs, out_rows=rows))
                assert all(same_bits(a, b) for a, b in zip(got, expected)), (backend, norm,
                                                                            rows.dtype)


def test_out_rows_of_any_strides():
    run_isolated("tests.kernels.test_patch_projection", "check_out_rows_of_any_strides")


def tensors(tree) -> list[torch.Tensor]:
    """The tensors in nested tuples, lists and dicts."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in tensors(item)]
    return []


class RecordAllocations(TorchDispatchMode):
    """Records (op, elements of its largest output that does not share storage with its inputs, i.e.
    that is not a view) for every op run inside it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tensors((args, kwargs))}
        self.ops.append((str(func), max((t.numel() for t in tensors(result)
                                         if t.untyped_storage().data_ptr() not in inputs),
                                        default=0)))
        return result


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_kernel_backend_makes_no_concatenated_or_resampled_copy(backend):
    """The forward creates nothing larger than its ``[M, D]`` rows (D is smaller than every
    encoder's channels here, so a concatenated, resampled or transposed copy of the features would
    show); the backward creates the inputs' gradients and ``[M, D]`` rows, never an ``[M, C]``
    operand."""
    case = Case(3, 2, (Encoder(True, True, 4, 100), Encoder(False, False, 4, 48)), 16, True, True,
                False)
    features, weight, kwargs, _ = make_inputs(case, torch.float32, torch.Generator(), False)
    impl = PATCH_PROJECTION_BACKENDS[backend].impl
    args = (kwargs["bias"], kwargs["norm_weight"], kwargs["norm_bias"])
    rows = case.views * 5
    with RecordAllocations() as record:
        _, pre_norm, mean, rstd = impl.forward(features, weight, *args, None, None, 2, 2, 1e-5)
    assert all(numel <= rows * case.width for _, numel in record.ops), record.ops
    with RecordAllocations() as record:
        impl.backward(torch.ones(rows, case.width), features, weight, *args, None, pre_norm, mean,
                      rstd, 2, 2, 1e-5, [True] * 6)
    operands = {rows * 100, rows * 48, rows * 148, 3 * 100 * 4, 3 * 48 * 4}
    assert not any(numel in operands or "cat" in op for op, numel in record.ops), record.ops


def test_layout_inference():
    grid = (16, 16)
    shapes = {(2, 1 + 32 * 32, 8): (True, 1, 32, 32, 2, 2, 1, 1),
              (2, 256, 8): (True, 0, 16, 16, 1, 1, 1, 1),
              (2, 1 + 64, 8): (True, 1, 8, 8, 1, 1, 2, 2),
              (2, 8, 32, 8): (False, 0, 32, 8, 2, 1, 1, 2)}
    for shape, expected in shapes.items():
        (layout,) = feature_layouts([torch.empty(shape)], grid)
        assert layout == FeatureLayout(expected[0], expected[1], 8, *expected[2:]), shape
    # A non-square grid: tokens take its aspect ratio scaled by k or 1/k.
    (layout,) = feature_layouts([torch.empty(1, 1 + 4 * 16, 3)], (2, 8))
    assert (layout.global_tokens, layout.height, layout.width) == (1, 4, 16)
    (layout,) = feature_layouts([torch.empty(1, 1, 3)], (1, 1))
    assert (layout.global_tokens, layout.height, layout.width) == (0, 1, 1)


def test_views_of_zero_images():
    weight = torch.randn(8, 5, requires_grad=True)
    features = [torch.randn(0, 5, 2, 2, requires_grad=True)]
    for backend in BACKENDS:
        y = sphinx_kernels.patch_projection(features, weight, grid=2, norm_weight=torch.ones(8),
                                            backend=backend)
        assert y.shape == (0, 8)
        y.sum().backward()
        assert torch.equal(weight.grad, torch.zeros_like(weight))
        assert features[0].grad.shape == features[0].shape
        out = torch.randn(4, 8)
        empty_rows = torch.zeros(0, dtype=torch.int64)
        assert torch.equal(sphinx_kernels.patch_projection(
            features, weight, grid=2, out=out, out_rows=empty_rows, backend=backend), out)
        weight.grad = None


def bad_calls():
    f = [torch.randn(2, 17, 6), torch.randn(2, 4, 4, 4)]
    w = torch.randn(8, 10)
    rows = torch.arange(10)
    out = torch.randn(12, 8)
    return [
        (dict(features=f[0]), TypeError, "features must be a list"),
        (dict(features=[]), ValueError, "at least one tensor"),
        (dict(weight=torch.randn(8, 11)), ValueError, "weight has in_features 11 but the "
                                                      "features' channels sum to 10 (6 + 4)"),
        (dict(features=[f[0], torch.randn(2, 4, 3, 3)]), ValueError, "features[1] has a 3x3 grid"),
        (dict(features=[torch.randn(2, 11, 6), f[1]]), ValueError, "features[0] has 11 tokens"),
        (dict(features=[f[0], torch.randn(3, 4, 4, 4)]), ValueError, "features[1] has V = 3"),
        (dict(features=[f[0].half(), f[1]]), TypeError, "features[0] has dtype float16"),
        (dict(features=[f[0], f[1].long()]), TypeError, "features[1] has dtype int64"),
        (dict(weight=w.long()), TypeError, "weight must have dtype"),
        (dict(features=[f[0], f[1].to("meta")]), ValueError, "features[1] is on meta"),
        (dict(features=[f[0], f[1][0, 0]]), ValueError, "features[1] must be tokens"),
        (dict(grid=3), ValueError, "features[0] has 17 tokens"),
        (dict(grid=(2, 0)), ValueError, "grid must be a positive int"),
        (dict(bias=torch.randn(7)), ValueError, "bias must be [D] = [8]"),
        (dict(bias=torch.randn(8).double()), TypeError, "bias must have dtype float32"),
        (dict(norm_bias=torch.randn(8)), ValueError, "norm_bias needs norm_weight"),
        (dict(eps=-1.0), ValueError, "eps must be a finite float >= 0"),
        (dict(eps=10**400), ValueError, "eps must be a finite float >= 0"),
        (dict(eps=True), TypeError, "eps must be a float, got True"),
        (dict(grid=2**40), ValueError, "grid must give 1 + gh * gw < 2^31 rows per view"),
        (dict(grid=(2**20, 2**20)), ValueError, "grid must give 1 + gh * gw < 2^31 rows per view"),
        (dict(out=out), ValueError, "out and out_rows go together"),
        (dict(out_rows=rows), ValueError, "out and out_rows go together"),
        (dict(out=out[:, :7], out_rows=rows), ValueError, "out must be [R, D] with D = 8"),
        (dict(out=out, out_rows=rows.float()), TypeError, "out_rows must have dtype"),
        (dict(out=out, out_rows=rows[:-1]), ValueError, "one entry per output row"),
        (dict(out=out, out_rows=rows + 3), ValueError, "out_rows must be in [0, R) = [0, 12)"),
        (dict(out=out, out_rows=rows - 1), ValueError, "out_rows must be in [0, R)"),
        (dict(out=out, out_rows=rows.clamp(max=8)), ValueError, "out_rows must be distinct"),
    ]


@pytest.mark.parametrize("index", range(len(bad_calls())))
def test_bad_input_raises_naming_the_argument(index):
    overrides, error, message = bad_calls()[index]
    call = dict(features=[torch.randn(2, 17, 6), torch.randn(2, 4, 4, 4)],
                weight=torch.randn(8, 10), grid=2)
    call.update(overrides)
    features, weight = call.pop("features"), call.pop("weight")
    with pytest.raises(error, match=re.escape(message)):
        sphinx_kernels.patch_projection(features, weight, **call)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm,out", [(True, True), (False, False)])
def test_opcheck(backend, norm, out):
    case = Case(2, 2, (Encoder(True, True, 4, 5), Encoder(False, False, 1, 3)), 16, True, norm, out)
    features, weight, kwargs, _ = make_inputs(case, torch.float32, torch.Generator().manual_seed(0))
    torch.library.opcheck(torch.ops.sphinx_kernels.patch_projection.default, (
        features, weight, kwargs["bias"], kwargs.get("norm_weight"), kwargs.get("norm_bias"),
        kwargs.get("out"), kwargs.get("out_rows"), 2, 2, 1e-5, backend))


def test_compiles_with_fullgraph_forward_and_backward():
    case = Case(3, 2, (Encoder(True, True, 4, 6), Encoder(False, False, 4, 5)), 16, True, True,
                True)
    features, weight, kwargs, tensors = make_inputs(case, torch.float32,
                                                    torch.Generator().manual_seed(1))

    def step(features, weight, kwargs):
        return (sphinx_kernels.patch_projection(features, weight, **kwargs) * 3).sum()

    compiled = torch.compile(step, fullgraph=True)
    compiled(features, weight, kwargs).backward()
    from_compiled = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    step(features, weight, kwargs).backward()
    assert all(torch.equal(a, t.grad) for a, t in zip(from_compiled, tensors))


# ----------------------------------------------------------------------------------------------
# GPU: bf16 at SPHINX-X sizes (skipped without a GPU).


def sphinx_inputs(views, width, gen, requires_grad=True):
    """DINOv2 tokens (CLS + 16x16 patches, 1536 channels) and a ConvNeXt map pooled 2x2 to 16x16
    (3072 channels) in bf16, projected to ``width`` with LayerNorm, into a shuffled packed
    sequence."""
    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen).to("cuda") * scale).to(
            torch.bfloat16)
    features = [rand(views, 257, 1536), rand(views, 3072, 32, 32)]
    rows = views * 257
    kwargs = {"grid": 16, "bias": rand(width), "norm_weight": 1 + rand(width, scale=0.1),
              "norm_bias": rand(width, scale=0.1), "out": rand(rows + 100, width),
              "out_rows": torch.randperm(rows + 100, generator=gen)[:rows].to("cuda")}
    weight = rand(width, 4608, scale=4608 ** -0.5)
    tensors = [*features, weight, kwargs["bias"], kwargs["norm_weight"], kwargs["norm_bias"],
               kwargs["out"]]
    for t in tensors:
        t.requires_grad_(requires_grad)
    return features, weight, kwargs, tensors


@pytest.mark.gpu
@pytest.mark.parametrize("views,width", [(5, 2048), (5, 4096), (80, 4096)])
def test_gpu_bf16_sphinx_sizes_within_tolerance(views, width):
    case = Case(views, 16, (Encoder(True, True, 16, 1536), Encoder(False, False, 32, 3072)), width,
                True, True, True)
    check_against_float64("triton", case, torch.bfloat16,
                          lambda gen: sphinx_inputs(views, width, gen), seed=0)


@pytest.mark.gpu
def test_gpu_forward_allocates_no_concatenated_copy():
    features, weight, kwargs, _ = sphinx_inputs(40, 4096, torch.Generator().manual_seed(0),
                                                requires_grad=False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    sphinx_kernels.patch_projection(features, weight, backend="triton", **kwargs)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    concat_bytes = 40 * 257 * 4608 * 2
    # The result (a copy of out) and the pre-norm rows, both [~M, D]; no [M, 4608] concatenation.
    assert extra < 2 * kwargs["out"].numel() * 2 + concat_bytes // 2
