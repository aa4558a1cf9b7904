"""apply_rotary on every backend this machine can run: forward and gradients within the tolerance
rule (docs/numerics.md) of transformers' own ``apply_rotary_pos_emb`` evaluated in float64, q and k
together, strided views, tables with unequal halves, bad inputs, out-of-table positions, opcheck and
torch.compile."""
from __future__ import annotations

import random
import re

import pytest
import torch

import sphinx_kernels
from sphinx_kernels.ops.apply_rotary import APPLY_ROTARY_BACKENDS
from tests.numerics import (
    FORWARD_FACTOR,
    GRADIENT_FACTOR,
    assert_all_within_torch_error,
    skip_if_interpreter_rounds_bf16,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = APPLY_ROTARY_BACKENDS.available(APPLY_ROTARY_BACKENDS.request(DEVICE, torch.float32))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The acceptance grid; each test draws a few configurations from it.
TOKENS, Q_HEADS, K_HEADS, HEAD_DIMS = (1, 7, 59, 97), (1, 3, 8), (1, 2), (16, 64, 80, 128)


def sample_configs(count: int, seed: int):
    rng = random.Random(seed)
    return [(rng.choice(TOKENS), rng.choice(Q_HEADS), rng.choice(K_HEADS), rng.choice(HEAD_DIMS))
            for _ in range(count)]


def hf_tables(positions: int, dim: int, dtype, device=DEVICE, base=10000.0):
    """cos, sin ``[P, D]`` as Hugging Face's LlamaRotaryEmbedding builds them (halves equal)."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(positions, dtype=torch.float64), inv_freq)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype).to(device), emb.sin().to(dtype).to(device)


def hf_formula(q, k, cos, sin, pos, dtype):
    """transformers' ``apply_rotary_pos_emb`` of packed ``[T, H, D]`` q and k, evaluated in
    ``dtype`` (Llama casts the tables to the activations' dtype)."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama",
                                reason="transformers (the test extra) is the rotary oracle")
    c, s = (t.to(dtype)[pos.long()] for t in (cos, sin))
    return llama.apply_rotary_pos_emb(q.to(dtype), k.to(dtype), c, s, unsqueeze_dim=1)


def make_inputs(num_tokens, q_heads, k_heads, dim, dtype, gen, general_tables=False,
                requires_grad=False):
    positions = 2 * num_tokens + 3
    if general_tables:  # unequal halves: the kernel must read both
        cos = torch.rand(positions, dim, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
        sin = torch.rand(positions, dim, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    else:
        cos, sin = hf_tables(positions, dim, dtype)
    q, k = (torch.randn(num_tokens, h, dim, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
            .requires_grad_(requires_grad) for h in (q_heads, k_heads))
    pos = torch.randint(positions, (num_tokens,), generator=gen).to(DEVICE)
    return q, k, cos, sin, pos


def rotation_pairs(q, k, cos, sin, pos, grads=None):
    """(same dtype, float64) pairs of transformers' rotation of q and k, or, with ``grads``, of the
    gradients of q and k for those output gradients."""
    if grads is None:
        return list(zip(hf_formula(q, k, cos, sin, pos, q.dtype),
                        hf_formula(q, k, cos, sin, pos, torch.float64)))
    results = []
    for dtype in (q.dtype, torch.float64):
        leaves = [x.detach().to(dtype).requires_grad_(True) for x in (q, k)]
        torch.autograd.backward(hf_formula(*leaves, cos, sin, pos, dtype),
                                [g.to(dtype) for g in grads])
        results.append([x.grad for x in leaves])
    return list(zip(*results))


def random_like(tensors, gen):
    return [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype).to(DEVICE)
            for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("general_tables", [False, True])
def test_forward_within_tolerance_of_float64(backend, dtype, general_tables, seed):
    skip_if_interpreter_rounds_bf16(backend, dtype)
    gen = torch.Generator().manual_seed(seed)
    for num_tokens, q_heads, k_heads, dim in sample_configs(3, seed):
        what = f"T={num_tokens} Hq={q_heads} Hk={k_heads} D={dim} {backend}"
        q, k, cos, sin, pos = make_inputs(num_tokens, q_heads, k_heads, dim, dtype, gen,
                                          general_tables)
        pos = pos.int() if num_tokens % 2 else pos  # int32 and int64 positions
        q_out, k_out = sphinx_kernels.apply_rotary((q, k), cos, sin, pos, backend=backend)
        single = sphinx_kernels.apply_rotary(q, cos, sin, pos, backend=backend)
        assert torch.equal(single, q_out), what
        for x, out in ((q, q_out), (k, k_out)):
            assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous(), what
        first = rotation_pairs(q, k, cos, sin, pos)
        assert_all_within_torch_error(
            [q_out, k_out], [exact for _, exact in first],
            lambda g: rotation_pairs(*random_like((q, k), g), cos, sin, pos), gen,
            [FORWARD_FACTOR] * 2, ["q", "k"], what, first=first)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_within_tolerance_of_float64(backend, dtype, seed):
    skip_if_interpreter_rounds_bf16(backend, dtype)
    gen = torch.Generator().manual_seed(seed)
    for num_tokens, q_heads, k_heads, dim in sample_configs(2, seed):
        what = f"T={num_tokens} Hq={q_heads} Hk={k_heads} D={dim} {backend} grad"
        # Unequal table halves: the backward must swap sin's halves, not only negate them.
        q, k, cos, sin, pos = make_inputs(num_tokens, q_heads, k_heads, dim, dtype, gen,
                                          general_tables=True, requires_grad=True)
        grads = random_like((q, k), gen)
        q_out, k_out = sphinx_kernels.apply_rotary((q, k), cos, sin, pos, backend=backend)
        torch.autograd.backward([q_out, k_out], grads)
        first = rotation_pairs(q, k, cos, sin, pos, grads)
        assert_all_within_torch_error(
            [q.grad, k.grad], [exact for _, exact in first],
            lambda g: rotation_pairs(q, k, cos, sin, pos, random_like(grads, g)), gen,
            [GRADIENT_FACTOR] * 2, ["q", "k"], what, first=first)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_of_a_fused_projection(backend, seed):
    """q and k as views of one qkv tensor (token stride (Hq + 2 Hk) D) are read in place."""
    gen = torch.Generator().manual_seed(seed)
    num_tokens, q_heads, k_heads, dim = 13, 4, 2, 64
    qkv = torch.randn(num_tokens, (q_heads + 2 * k_heads) * dim, generator=gen).to(DEVICE)
    q = qkv[:, :q_heads * dim].view(num_tokens, q_heads, dim)
    k = qkv[:, q_heads * dim:(q_heads + k_heads) * dim].view(num_tokens, k_heads, dim)
    cos, sin = hf_tables(40, dim, torch.float32)
    pos = torch.randint(40, (num_tokens,), generator=gen).to(DEVICE)
    q_out, k_out = sphinx_kernels.apply_rotary((q, k), cos, sin, pos, backend=backend)
    expected = sphinx_kernels.apply_rotary((q.contiguous(), k.contiguous()), cos, sin, pos,
                                           backend=backend)
    assert torch.equal(q_out, expected[0]) and torch.equal(k_out, expected[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_positions_reset_per_packed_sample(backend, seed):
    """Each packed sample rotated from position 0 equals that sample rotated on its own."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [5, 0, 9, 1]
    cos, sin = hf_tables(16, 16, torch.float32)
    x = torch.randn(sum(lengths), 3, 16, generator=gen).to(DEVICE)
    pos = torch.cat([torch.arange(n) for n in lengths]).to(DEVICE)
    packed = sphinx_kernels.apply_rotary(x, cos, sin, pos, backend=backend)
    start = 0
    for n in lengths:
        alone = sphinx_kernels.apply_rotary(x[start:start + n], cos, sin,
                                            torch.arange(n, device=DEVICE), backend=backend)
        assert torch.equal(packed[start:start + n], alone)
        start += n


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    cos, sin = hf_tables(4, 16, torch.float32)
    empty = torch.zeros(0, 2, 16, device=DEVICE)
    pos = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    assert sphinx_kernels.apply_rotary(empty, cos, sin, pos, backend=backend).shape == (0, 2, 16)
    q = torch.randn(3, 2, 16, device=DEVICE)
    q_out, k_out = sphinx_kernels.apply_rotary((q, q[:, :0]), cos, sin,
                                               torch.tensor([0, 3, 1], device=DEVICE),
                                               backend=backend)
    assert k_out.shape == (3, 0, 16)
    assert torch.equal(q_out, sphinx_kernels.apply_rotary(q, cos, sin,
                                                          torch.tensor([0, 3, 1], device=DEVICE),
                                                          backend=backend))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_out_of_table_position_past_validation_gives_nan_rows(backend):
    """Kernels stay in bounds on positions that reach them unchecked (a GPU without value
    checks)."""
    cos, sin = hf_tables(4, 16, torch.float32)
    q = torch.randn(3, 2, 16, device=DEVICE)
    pos = torch.tensor([1, 4, -1], device=DEVICE)
    q_out, _ = torch.ops.sphinx_kernels.apply_rotary(q, q[:, :0], cos, sin, pos, False, backend)
    assert torch.isfinite(q_out[0]).all() and torch.isnan(q_out[1:]).all()


def _cases():
    q = torch.randn(5, 2, 16, device=DEVICE)
    cos, sin = hf_tables(8, 16, torch.float32)
    return q, cos, sin, torch.arange(5, device=DEVICE)


BAD_INPUTS = [
    (lambda q, c, s, p: (q, c, s, p + 4), ValueError,
     "position_ids must be in [0, P) = [0, 8) (P from cos), got values in [4, 8]"),
    (lambda q, c, s, p: (q, c, s, p - 1), ValueError, "position_ids must be in [0, P)"),
    (lambda q, c, s, p: ((q, q, q), c, s, p), ValueError, "x must be one tensor or a pair"),
    (lambda q, c, s, p: ((q, None), c, s, p), TypeError, "x[1] must be a torch.Tensor, got None"),
    (lambda q, c, s, p: ((None, q), c, s, p), TypeError, "x[0] must be a torch.Tensor, got None"),
    (lambda q, c, s, p: (q.double(), c, s, p), TypeError, "x must have dtype"),
    (lambda q, c, s, p: (q[0], c, s, p), ValueError, "x must be 3-D"),
    (lambda q, c, s, p: (q[..., :15], c[:, :15], s[:, :15], p), ValueError,
     "x must have an even head dim D >= 2"),
    (lambda q, c, s, p: (q.transpose(1, 2).contiguous().transpose(1, 2), c, s, p), ValueError,
     "x must have unit stride along D"),
    (lambda q, c, s, p: ((q, q.half()), c, s, p), TypeError, "x[1] must have dtype float32"),
    (lambda q, c, s, p: ((q, q[:4]), c, s, p[:4]), ValueError, "x[1] has shape (4, 2, 16)"),
    (lambda q, c, s, p: (q, c[:, :8], s, p), ValueError, "cos must be [P, D] with D = 16"),
    (lambda q, c, s, p: (q, c, s.half(), p), ValueError, "sin ((8, 16), float16) must match cos"),
    (lambda q, c, s, p: (q, c, s.long(), p), TypeError, "sin must have dtype"),
    (lambda q, c, s, p: (q, c.clone().requires_grad_(), s, p), ValueError,
     "cos requires grad, but apply_rotary gives the tables no gradient"),
    (lambda q, c, s, p: (q, c, s, p.float()), TypeError, "position_ids must have dtype"),
    (lambda q, c, s, p: (q, c, s, p[:4]), ValueError,
     "position_ids has 4 entries but x has T = 5 tokens"),
    (lambda q, c, s, p: (q, c, s, p.to("meta")), ValueError, "position_ids is on meta"),
]


@pytest.mark.parametrize("make_bad,error,message", BAD_INPUTS)
def test_bad_input_raises_naming_the_argument(make_bad, error, message, value_checks_on):
    with pytest.raises(error, match=re.escape(message)):
        sphinx_kernels.apply_rotary(*make_bad(*_cases()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    gen = torch.Generator().manual_seed(11)
    q, k, cos, sin, pos = make_inputs(9, 3, 1, 16, torch.float32, gen, requires_grad=True)
    torch.library.opcheck(torch.ops.sphinx_kernels.apply_rotary.default,
                          (q, k, cos, sin, pos, False, backend))


def test_compiles_with_fullgraph_forward_and_backward():
    gen = torch.Generator().manual_seed(5)
    q, k, cos, sin, pos = make_inputs(11, 4, 2, 64, torch.float32, gen, requires_grad=True)

    def attend(q, k):
        q_out, k_out = sphinx_kernels.apply_rotary((q, k), cos, sin, pos)
        return (q_out.sum(1) * k_out.sum(1)).sum()

    torch.compile(attend, fullgraph=True)(q, k).backward()
    compiled = [q.grad.clone(), k.grad.clone()]
    q.grad = k.grad = None
    attend(q, k).backward()
    assert torch.equal(compiled[0], q.grad) and torch.equal(compiled[1], k.grad)


# ----------------------------------------------------------------------------------------------
# GPU: the Triton kernel at real sizes and in bf16 (skipped without a GPU).


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 80, 128])
def test_gpu_forward_and_backward_at_scale(dtype, dim):
    """16k packed tokens, 32 query heads and 8 key heads (GQA), against float64."""
    gen = torch.Generator().manual_seed(0)
    q, k, cos, sin, pos = make_inputs(16384, 32, 8, dim, dtype, gen, requires_grad=True)
    grads = [torch.randn(x.shape, generator=gen).to(dtype).to(DEVICE) for x in (q, k)]
    q_out, k_out = sphinx_kernels.apply_rotary((q, k), cos, sin, pos, backend="triton")
    torch.autograd.backward([q_out, k_out], grads)
    first = rotation_pairs(q, k, cos, sin, pos)
    assert_all_within_torch_error(
        [q_out, k_out], [exact for _, exact in first],
        lambda g: rotation_pairs(*random_like((q, k), g), cos, sin, pos), gen,
        [FORWARD_FACTOR] * 2, ["q", "k"], f"{dtype} D={dim}", first=first)
    first = rotation_pairs(q, k, cos, sin, pos, grads)
    assert_all_within_torch_error(
        [q.grad, k.grad], [exact for _, exact in first],
        lambda g: rotation_pairs(q, k, cos, sin, pos, random_like(grads, g)), gen,
        [GRADIENT_FACTOR] * 2, ["q", "k"], f"{dtype} D={dim} grad", first=first)
