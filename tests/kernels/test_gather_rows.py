"""gather_rows on every backend this machine can run: exact forward, deterministic gradients within
DESIGN.md's tolerance of a float64 reference, bad inputs, opcheck and torch.compile."""
from __future__ import annotations

import re

import pytest
import torch

import sphinx_kernels
from sphinx_kernels.ops.gather_rows import GATHER_ROWS_BACKENDS, gather_rows_reference
from tests.numerics import (
    GRADIENT_FACTOR,
    assert_all_within_torch_error,
    interpreter_rounds_bf16,
    skip_if_interpreter_rounds_bf16,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def runnable_backends(device=DEVICE):
    return GATHER_ROWS_BACKENDS.available(GATHER_ROWS_BACKENDS.request(device, torch.float32))


BACKENDS = runnable_backends()
KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]


def make_case(num_rows, width, dtype, index_dtype=torch.int32, source_rows=(13, 0, 1, 40),
              device=DEVICE, seed=0, requires_grad=False):
    """Random sources (one of them empty) and random (source, row) pairs, about 1 in 8 of them
    padding."""
    gen = torch.Generator().manual_seed(seed)
    sources = [torch.randn(n, width, generator=gen, dtype=torch.float64).to(dtype).to(device)
               .requires_grad_(requires_grad) for n in source_rows]
    readable = [s for s, n in enumerate(source_rows) if n > 0]
    pick = torch.randint(len(readable), (num_rows,), generator=gen)
    source_ids = torch.tensor(readable)[pick]
    limit = torch.tensor(source_rows)[source_ids]
    row_ids = (torch.rand(num_rows, generator=gen) * limit).long()
    padding = torch.rand(num_rows, generator=gen) < 0.125
    source_ids = torch.where(padding, -1, source_ids)
    return sources, source_ids.to(index_dtype).to(device), row_ids.to(index_dtype).to(device)


def loop_gather(sources, source_ids, row_ids):
    """The definition, one row at a time: independent of every backend, the reference included."""
    rows = []
    for s, r in zip(source_ids.tolist(), row_ids.tolist()):
        rows.append(sources[s][r] if s >= 0 else torch.zeros_like(sources[0][0]))
    return torch.stack(rows) if rows else sources[0].new_zeros((0, sources[0].shape[1]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows,width", [(0, 7), (1, 1), (7, 257), (59, 7), (97, 64), (1025, 3)])
def test_forward_is_exact(backend, dtype, num_rows, width, seed):
    sources, source_ids, row_ids = make_case(num_rows, width, dtype, seed=seed)
    out = sphinx_kernels.gather_rows(sources, source_ids, row_ids, backend=backend)
    assert out.dtype == dtype and out.shape == (num_rows, width)
    assert torch.equal(out, loop_gather(sources, source_ids, row_ids))


@pytest.mark.parametrize("backend", BACKENDS)
def test_int64_indices_and_strided_sources(backend):
    """Row-strided views and expanded (stride-0) rows are read in place, int64 indices accepted."""
    table = torch.randn(30, 20, dtype=torch.float32, device=DEVICE)
    strided = table[::3, 2:9]                    # row stride 60 elements, width 7
    expanded = torch.randn(1, 7, device=DEVICE).expand(5, 7)
    sources = [strided, expanded]
    source_ids = torch.tensor([1, 0, 0, -1, 1, 0], device=DEVICE)
    row_ids = torch.tensor([4, 9, 0, 3, 0, 5], device=DEVICE)
    out = sphinx_kernels.gather_rows(sources, source_ids, row_ids, backend=backend)
    assert torch.equal(out, loop_gather(sources, source_ids, row_ids))


def gradients(backend, sources, source_ids, row_ids, grad_out):
    for s in sources:
        s.grad = None
    out = sphinx_kernels.gather_rows(sources, source_ids, row_ids, backend=backend)
    out.backward(grad_out)
    return [None if s.grad is None else s.grad.clone() for s in sources]


def summed_gradients(source_shapes, source_ids, row_ids, grad_out, dtype):
    """(same dtype, float64) pairs of each source's gradient, summed by PyTorch's index_add."""
    pairs = []
    for s, shape in enumerate(source_shapes):
        hit = source_ids == s
        rows = row_ids[hit].long()
        same = torch.zeros(shape, dtype=dtype, device=DEVICE).index_add_(0, rows, grad_out[hit])
        exact = torch.zeros(shape, dtype=torch.float64, device=DEVICE).index_add_(
            0, rows, grad_out[hit].double())
        pairs.append((same, exact))
    return pairs


def assert_gradients_within_torch_error(backend, grads, sources, source_ids, row_ids, grad_out,
                                        seed):
    """The gradients against float64 sums, judged by PyTorch's error on sums of fresh gradients."""
    shapes = [s.shape for s in sources]
    dtype = sources[0].dtype

    def draw(gen):
        fresh = torch.randn(grad_out.shape, generator=gen, dtype=torch.float64).to(dtype)
        return summed_gradients(shapes, source_ids, row_ids, fresh.to(DEVICE), dtype)

    first = summed_gradients(shapes, source_ids, row_ids, grad_out, dtype)
    assert_all_within_torch_error(
        grads, [exact for _, exact in first], draw, torch.Generator().manual_seed(seed),
        [GRADIENT_FACTOR] * len(grads), [f"grad of sources[{s}]" for s in range(len(grads))],
        backend, first=first)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_within_tolerance_of_float64(backend, dtype, seed):
    skip_if_interpreter_rounds_bf16(backend, dtype)
    # Few source rows read by many output rows: every gradient row sums many terms.
    sources, source_ids, row_ids = make_case(300, 33, dtype, source_rows=(5, 0, 1, 9),
                                             requires_grad=True, seed=seed)
    grad_out = torch.randn(300, 33, device=DEVICE, dtype=torch.float64).to(dtype)
    grads = gradients(backend, sources, source_ids, row_ids, grad_out)
    assert_gradients_within_torch_error(backend, grads, sources, source_ids, row_ids, grad_out,
                                        seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gradients_are_deterministic_and_equal_across_kernel_backends(dtype, seed):
    sources, source_ids, row_ids = make_case(500, 40, dtype, source_rows=(7, 3),
                                             requires_grad=True, seed=seed)
    grad_out = torch.randn(500, 40, device=DEVICE).to(dtype)
    results = {}
    for backend in KERNEL_BACKENDS:
        first, again = (gradients(backend, sources, source_ids, row_ids, grad_out) for _ in "12")
        assert all(torch.equal(a, b) for a, b in zip(first, again)), f"{backend} not deterministic"
        results[backend] = first
    comparable = {b: g for b, g in results.items() if not interpreter_rounds_bf16(b, dtype)}
    baseline = next(iter(comparable.values()))
    for backend, grads in comparable.items():
        assert all(torch.equal(a, b) for a, b in zip(grads, baseline)), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_sources_that_require_grad_get_one(backend, seed):
    sources, source_ids, row_ids = make_case(50, 8, torch.float32, source_rows=(6, 4, 2), seed=seed)
    sources[1].requires_grad_(True)
    grad_out = torch.randn(50, 8, device=DEVICE)
    grads = gradients(backend, sources, source_ids, row_ids, grad_out)
    assert grads[0] is None and grads[2] is None
    # Source 1 alone: its rows numbered 0 in a one-source call.
    assert_gradients_within_torch_error(backend, grads[1:2], sources[1:2],
                                        torch.where(source_ids == 1, 0, -1), row_ids, grad_out,
                                        seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_rows_pass_no_gradient(backend, seed):
    sources, source_ids, row_ids = make_case(40, 5, torch.float32, source_rows=(4,),
                                             requires_grad=True, seed=seed)
    grad_out = torch.zeros(40, 5, device=DEVICE)
    grad_out[source_ids < 0] = 1e6  # gradient flowing into padding rows must vanish
    (grad,) = gradients(backend, sources, source_ids, row_ids, grad_out)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_index_past_validation_gives_nan_rows(backend):
    """Kernels stay in bounds on indices that reach them unchecked (a GPU without value checks)."""
    sources = [torch.randn(3, 6, device=DEVICE)]
    source_ids = torch.tensor([0, 0, 1, 0], dtype=torch.int32, device=DEVICE)
    row_ids = torch.tensor([2, 3, 0, -1], dtype=torch.int32, device=DEVICE)
    out = torch.ops.sphinx_kernels.gather_rows(sources, source_ids, row_ids, backend)
    assert torch.equal(out[0], sources[0][2])
    assert torch.isnan(out[1:]).all()


BAD_INPUTS = [
    (lambda s, i, r: (s[0], i, r), TypeError, "sources must be a list"),
    (lambda s, i, r: ([], i, r), ValueError, "sources must hold 1 to 16"),
    (lambda s, i, r: (s * 9, i, r), ValueError, "sources must hold 1 to 16"),
    (lambda s, i, r: ([s[0].long()], i, r), TypeError, "sources[0] must have dtype"),
    (lambda s, i, r: ([s[0], s[1].double()], i, r), TypeError, "sources[1] has dtype"),
    (lambda s, i, r: ([s[0], s[1][:, :3]], i, r), ValueError, "sources[1] has width"),
    (lambda s, i, r: ([s[0], s[1].t().contiguous().t()], i, r), ValueError, "unit stride"),
    (lambda s, i, r: ([s[0][None]], i, r), ValueError, "sources[0] must be 2-D"),
    (lambda s, i, r: (s, i.float(), r), TypeError, "source_ids must have dtype"),
    (lambda s, i, r: (s, i, r.long()), TypeError, "row_ids has dtype"),
    (lambda s, i, r: (s, i, r[:-1]), ValueError, "row_ids has shape"),
    (lambda s, i, r: (s, i[None], r), ValueError, "source_ids must be 1-D"),
    (lambda s, i, r: (s, i + 2, r), ValueError, "source_ids must be < len(sources)"),
    (lambda s, i, r: (s, i, r + 100), ValueError, "out of range for sources"),
    (lambda s, i, r: (s, i, r - 100), ValueError, "out of range for sources"),
    (lambda s, i, r: (s, i.to("meta"), r), ValueError, "source_ids is on meta"),
]


@pytest.mark.parametrize("make_bad,error,message", BAD_INPUTS)
@pytest.mark.usefixtures("value_checks_on")
def test_bad_input_raises_naming_the_argument(make_bad, error, message):
    sources = [torch.randn(6, 4, device=DEVICE), torch.randn(6, 4, device=DEVICE)]
    source_ids = torch.tensor([0, 1, -1, 1], dtype=torch.int32, device=DEVICE)
    row_ids = torch.tensor([5, 0, 9, 2], dtype=torch.int32, device=DEVICE)
    with pytest.raises(error, match=re.escape(message)):
        sphinx_kernels.gather_rows(*make_bad(sources, source_ids, row_ids))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    sources, source_ids, row_ids = make_case(37, 9, torch.float32, seed=3, requires_grad=True)
    torch.library.opcheck(torch.ops.sphinx_kernels.gather_rows.default,
                          (sources, source_ids, row_ids, backend))


def test_compiles_with_fullgraph_forward_and_backward():
    sources, source_ids, row_ids = make_case(64, 16, torch.float32, seed=5, requires_grad=True)

    def assemble(table, visual, special, source_ids, row_ids):
        return (sphinx_kernels.gather_rows([table, visual, special], source_ids, row_ids) * 2).sum()

    compiled = torch.compile(assemble, fullgraph=True)
    loss = compiled(*sources[:3], source_ids.clamp(max=2), row_ids.clamp(max=0))
    loss.backward()
    eager = [s.grad.clone() for s in sources[:3]]
    for s in sources:
        s.grad = None
    assemble(*sources[:3], source_ids.clamp(max=2), row_ids.clamp(max=0)).backward()
    assert all(torch.equal(a, s.grad) for a, s in zip(eager, sources[:3]))


def test_reference_backend_matches_loop_with_empty_input():
    sources = [torch.randn(0, 3), torch.randn(2, 3)]
    empty = torch.zeros(0, dtype=torch.int32)
    assert gather_rows_reference(sources, empty, empty).shape == (0, 3)


# ----------------------------------------------------------------------------------------------
# GPU: the CUDA and Triton kernels at real sizes (skipped without a GPU).


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_forward_exact_at_scale(backend, dtype):
    """10^6 rows x 4096 from three sources, against one index_select of the concatenated table."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = (32000, 20000, 3)
    sources = [torch.randn(n, 4096, device="cuda", dtype=dtype, generator=gen) for n in rows]
    num = 10**6
    source_ids = torch.randint(-1, 3, (num,), device="cuda", generator=gen, dtype=torch.int32)
    limit = torch.tensor(rows, device="cuda")[source_ids.clamp(min=0).long()]
    row_ids = (torch.rand(num, device="cuda", generator=gen) * limit).int()
    out = sphinx_kernels.gather_rows(sources, source_ids, row_ids, backend=backend)
    base = torch.tensor((0,) + rows[:-1], device="cuda").cumsum(0)
    flat = torch.where(source_ids < 0, sum(rows), base[source_ids.clamp(min=0).long()] + row_ids)
    table = torch.cat(sources + [torch.zeros(1, 4096, device="cuda", dtype=dtype)])
    assert torch.equal(out, table.index_select(0, flat))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_backward_deterministic_and_within_tolerance(dtype):
    sources, source_ids, row_ids = make_case(200_000, 1024, dtype, source_rows=(32000, 5000, 3),
                                             requires_grad=True, device="cuda")
    grad_out = torch.randn(200_000, 1024, device="cuda").to(dtype)
    results = [gradients(b, sources, source_ids, row_ids, grad_out)
               for b in ("cuda", "triton", "cuda")]
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    assert_gradients_within_torch_error("cuda", results[0], sources, source_ids, row_ids, grad_out,
                                        seed=0)
