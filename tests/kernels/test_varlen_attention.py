"""varlen_attention on every backend this machine runs: output and gradients within DESIGN.md's
tolerance of a float64 reference, the documented masks (bottom-right causal, prefix-LM), padding and
empty sequences, determinism, strided inputs, bad inputs, opcheck and torch.compile.

Configurations are drawn from the acceptance grid by a seeded sampler (a handful per test: the Triton
interpreter is slow); tensor values are fresh on every run, and the seed is in every failure message.
"""
from __future__ import annotations

import importlib.util
import random
import re

import pytest
import torch

import sphinx_kernels
from sphinx_kernels.ops import flash_attn
from sphinx_kernels.ops.varlen_attention import (VARLEN_ATTENTION_BACKENDS,
                                                 varlen_attention_backward_reference,
                                                 varlen_attention_mask, varlen_attention_reference)
from sphinx_kernels.triton.varlen_attention import tile_table
from tests.numerics import FORWARD_FACTOR, GRADIENT_FACTOR, assert_within_torch_error, max_error

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LENGTHS = (0, 1, 7, 59, 97, 130)
HEAD_DIMS = (16, 24, 32, 40, 64, 80, 96, 128)
MODES = ("causal", "non-causal", "prefix")


def runnable_backends(dtype=torch.float32):
    return VARLEN_ATTENTION_BACKENDS.available(
        VARLEN_ATTENTION_BACKENDS.request(DEVICE, dtype, head_dim=64))


# Here: triton (interpreted) and reference in float32 and float16; bf16 only on a GPU (the
# interpreter's bf16 arithmetic is wrong, ENVIRONMENT.md).
CPU_DTYPES = (torch.float32, torch.float16)
# The FlashAttention-2 peers need max_seqlen and serve no prefix: the GPU tests below check them.
FLASH_PEERS = ("torch_flash", "flash_attn")
BACKENDS = [b for b in runnable_backends() if b not in FLASH_PEERS]


def cu_seqlens(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32).to(DEVICE)


class Case:
    """A random packed batch: lengths, heads, head dim and mode drawn with ``config_seed``, values with
    a fresh seed; a few padding rows after the last sequence of both q and k."""

    def __init__(self, config_seed, dtype, mode="causal", separate_keys=False, max_seqs=9,
                 lengths=LENGTHS, head_dims=HEAD_DIMS, first_lens_q=(), first_lens_k=()):
        rng = random.Random(config_seed)
        num = max(rng.randint(1, max_seqs), len(first_lens_q))
        self.lens_q = [rng.choice(lengths) for _ in range(num)]
        self.lens_q[rng.randrange(num)] = rng.choice(lengths[-2:])  # one long sequence: several blocks
        self.lens_k = [rng.choice(lengths) for _ in range(num)] if separate_keys else self.lens_q
        # Chosen cases first (bottom-right corners), drawn ones after.
        self.lens_q[:len(first_lens_q)] = first_lens_q
        self.lens_k[:len(first_lens_k)] = first_lens_k
        self.kv_heads = rng.choice((1, 2))
        self.heads = self.kv_heads * rng.choice((1, 2, 4))
        self.head_dim = rng.choice(head_dims)
        self.causal = mode != "non-causal"
        self.prefix = (torch.tensor([rng.randint(0, n) for n in self.lens_k], dtype=torch.int32,
                                    device=DEVICE) if mode == "prefix" else None)
        self.cu_q = cu_seqlens(self.lens_q)
        self.cu_k = cu_seqlens(self.lens_k) if separate_keys else None
        pad = rng.randint(0, 3)
        total_q = sum(self.lens_q) + pad
        total_k = sum(self.lens_k) + (rng.randint(0, 3) if separate_keys else pad)
        self.seed = torch.seed() % 2**31
        gen = torch.Generator().manual_seed(self.seed)

        def rand(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)

        self.q = rand(total_q, self.heads, self.head_dim)
        self.k = rand(total_k, self.kv_heads, self.head_dim)
        self.v = rand(total_k, self.kv_heads, self.head_dim)
        self.grad = rand(total_q, self.heads, self.head_dim)
        self.dtype = dtype

    def describe(self):
        return (f"lens_q={self.lens_q} lens_k={self.lens_k} heads={self.heads}/{self.kv_heads} "
                f"D={self.head_dim} causal={self.causal} prefix="
                f"{None if self.prefix is None else self.prefix.tolist()} seed={self.seed}")

    def kwargs(self):
        return dict(causal=self.causal, prefix_lens=self.prefix)

    def run(self, backend, dtype=None, **extra):
        """Output and (dq, dk, dv) of the public op on ``backend``."""
        inputs = [t.to(dtype or self.dtype).detach().requires_grad_() for t in (self.q, self.k, self.v)]
        out = sphinx_kernels.varlen_attention(*inputs, self.cu_q, self.cu_k, backend=backend,
                                              **self.kwargs(), **extra)
        out.backward(self.grad.to(out.dtype))
        return out.detach(), [t.grad for t in inputs]

    def run_reference(self, dtype):
        """Output and gradients of the reference function differentiated by autograd, in ``dtype``."""
        inputs = [t.to(dtype).detach().requires_grad_() for t in (self.q, self.k, self.v)]
        out, _ = varlen_attention_reference(*inputs, self.cu_q, self.cu_k, **self.kwargs())
        out.backward(self.grad.to(dtype))
        # No sequence that reads a tensor (all empty): autograd leaves its gradient None.
        return out.detach(), [torch.zeros_like(t) if t.grad is None else t.grad for t in inputs]


def torch_error_floors(case, draws=3):
    """PyTorch's own errors (output, dq, dk, dv) on the case's shapes over ``draws`` fresh value
    draws: a batch of short sequences has few values, and one lucky draw left PyTorch's fp32 error
    at half its usual size (a run failed at 2.14x)."""
    floors = [0.0] * 4
    saved = case.q, case.k, case.v, case.grad
    for _ in range(draws):
        case.q, case.k, case.v, case.grad = (torch.randn_like(t, dtype=torch.float64).to(t.dtype)
                                             for t in saved)
        out64, grads64 = case.run_reference(torch.float64)
        out_same, grads_same = case.run_reference(case.dtype)
        errors = [max_error(a, b) for a, b in zip([out_same, *grads_same], [out64, *grads64])]
        floors = [max(f, e) for f, e in zip(floors, errors)]
    case.q, case.k, case.v, case.grad = saved
    return floors


def assert_matches_float64(case, backend):
    out, grads = case.run(backend)
    out64, grads64 = case.run_reference(torch.float64)
    out_same, grads_same = case.run_reference(case.dtype)
    floors = torch_error_floors(case)
    what = f"{backend} {str(case.dtype).removeprefix('torch.')} {case.describe()}"
    assert_within_torch_error(out, out64, out_same, FORWARD_FACTOR, f"out, {what}",
                              baseline_floor=floors[0])
    for name, grad, grad64, same, floor in zip("qkv", grads, grads64, grads_same, floors[1:]):
        assert_within_torch_error(grad, grad64, same, GRADIENT_FACTOR, f"d{name}, {what}",
                                  baseline_floor=floor)


def naive_attention(q, k, v, lens_q, lens_k, causal, prefix, scale):
    """The definition, one (sequence, head, query) at a time in float64, from the docstring's words:
    query i sits at key position p = i + Lk - Lq and sees key j iff p >= 0 and (j <= p, or j and p
    both in the prefix); without causal every key of its sequence."""
    q, k, v = (t.cpu().double() for t in (q, k, v))
    out = torch.zeros(q.shape, dtype=torch.float64)
    group = q.shape[1] // k.shape[1]
    q0 = k0 = 0
    for b, (len_q, len_k) in enumerate(zip(lens_q, lens_k)):
        prefix_len = int(prefix[b]) if prefix is not None else 0
        for h in range(q.shape[1]):
            for i in range(len_q):
                pos = i + len_k - len_q
                keys = [j for j in range(len_k) if not causal
                        or (pos >= 0 and (j <= pos or (pos < prefix_len and j < prefix_len)))]
                if not keys:
                    continue
                rows = torch.tensor(keys) + k0
                scores = (k[rows, h // group] @ q[q0 + i, h]) * scale
                weights = torch.softmax(scores, dim=0)
                out[q0 + i, h] = weights @ v[rows, h // group]
        q0, k0 = q0 + len_q, k0 + len_k
    return out


# --------------------------------------------------------------------------------------------------
# The reference against the definition, and the docstring's drawings.


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("separate_keys", [False, True])
def test_reference_matches_the_definition(mode, separate_keys):
    case = Case(config_seed=11 + MODES.index(mode), dtype=torch.float64, mode=mode,
                separate_keys=separate_keys, max_seqs=4, lengths=(0, 1, 5, 9, 13))
    out, lse = varlen_attention_reference(case.q, case.k, case.v, case.cu_q, case.cu_k,
                                          **case.kwargs())
    expected = naive_attention(case.q, case.k, case.v, case.lens_q, case.lens_k, case.causal,
                               case.prefix, case.head_dim ** -0.5)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-12, atol=1e-12, msg=case.describe)
    assert lse.dtype == torch.float64 and lse.shape == (case.heads, case.q.shape[0])


def test_mask_is_the_documented_drawing():
    def drawing(text):
        return torch.tensor([[c == "1" for c in row.split()] for row in text.strip().split("\n")])

    assert torch.equal(varlen_attention_mask(2, 5, 0, True, torch.device("cpu")),
                       drawing("1 1 1 1 0\n1 1 1 1 1"))
    assert torch.equal(varlen_attention_mask(5, 2, 0, True, torch.device("cpu")),
                       drawing("0 0\n0 0\n0 0\n1 0\n1 1"))
    assert torch.equal(varlen_attention_mask(5, 5, 3, True, torch.device("cpu")),
                       drawing("1 1 1 0 0\n1 1 1 0 0\n1 1 1 0 0\n1 1 1 1 0\n1 1 1 1 1"))


# --------------------------------------------------------------------------------------------------
# Every backend against float64, by the tolerance rule.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_output_and_gradients_within_tolerance(backend, dtype, mode):
    # One sampled configuration per (dtype, mode), the same for every backend.
    case = Case(config_seed=100 * CPU_DTYPES.index(dtype) + MODES.index(mode), dtype=dtype,
                mode=mode)
    assert_matches_float64(case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("mode", ("causal", "prefix"))
def test_bottom_right_causal_with_separate_keys(backend, dtype, mode):
    """cu_seqlens_k != cu_seqlens_q: more keys than queries (a KV cache), fewer (rows that see
    nothing), and none."""
    case = Case(config_seed=7 + CPU_DTYPES.index(dtype), dtype=dtype, mode=mode, separate_keys=True,
                max_seqs=5, first_lens_q=(7, 59, 3), first_lens_k=(59, 7, 0))
    assert_matches_float64(case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_rows_and_keyless_rows_are_zero_without_nan(backend):
    lens_q, lens_k = [3, 0, 5, 4], [0, 2, 2, 6]  # seq 0 has no keys, seq 2 has rows above the diagonal
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    q = torch.randn(15, 4, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(13, 2, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(13, 2, 16, device=DEVICE, requires_grad=True)
    out, lse = torch.ops.sphinx_kernels.varlen_attention(q, k, v, cu_q, cu_k, None, 15, 13, True, 0.25, False, backend)
    grad = torch.randn_like(out)
    grad[12:] = 1e6  # a gradient arriving at padding rows must vanish
    out.backward(grad)
    keyless = torch.tensor([0, 1, 2, 3, 4, 5], device=DEVICE)  # seq 0, and seq 2's rows 0..2
    assert torch.equal(out[12:], torch.zeros_like(out[12:]))
    assert torch.equal(out[keyless], torch.zeros_like(out[keyless]))
    assert not out.isnan().any() and (out[6:12].abs().sum(-1) > 0).all()
    if backend != "torch_flash":  # FA2 marks keyless rows +inf in its own lse
        assert torch.isneginf(lse[:, keyless]).all() and torch.isfinite(lse[:, 6:12]).all()
    for name, g, first_padding in (("dq", q.grad, 12), ("dk", k.grad, 10), ("dv", v.grad, 10)):
        assert torch.isfinite(g).all(), name
        assert torch.equal(g[first_padding:], torch.zeros_like(g[first_padding:])), name
    assert torch.equal(q.grad[keyless], torch.zeros_like(q.grad[keyless]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_matches_float64(backend):
    case = Case(config_seed=5, dtype=torch.float32, mode="prefix", separate_keys=True, max_seqs=4)
    _, lse = torch.ops.sphinx_kernels.varlen_attention(case.q, case.k, case.v, case.cu_q, case.cu_k, case.prefix,
                                  case.q.shape[0], case.k.shape[0], True, case.head_dim ** -0.5,
                                  False, backend)
    _, lse64 = varlen_attention_reference(case.q.double(), case.k.double(), case.v.double(),
                                          case.cu_q, case.cu_k, **case.kwargs())
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse64)), case.describe()
    finite = torch.isfinite(lse64)
    torch.testing.assert_close(lse[finite].double(), lse64[finite], rtol=1e-5, atol=1e-5,
                               msg=case.describe)


def test_deterministic_backward_is_bitwise_repeatable():
    case = Case(config_seed=3, dtype=torch.float16, mode="prefix", max_seqs=4)
    first, again = (case.run("triton", deterministic=True) for _ in "12")
    assert torch.equal(first[0], again[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], again[1])), case.describe()


def test_strided_views_of_a_fused_projection_give_the_same_bits():
    """q, k, v read in place from one fused ``[T, (Hq + 2 Hkv) D]`` tensor (row stride 7 D)."""
    heads, kv_heads, head_dim = 4, 2, 24
    cu = cu_seqlens([9, 0, 70, 1])
    qkv = torch.randn(83, (heads + 2 * kv_heads) * head_dim + 24, device=DEVICE)[:, 24:]
    qkv.requires_grad_(True)
    q, k, v = qkv.view(83, -1, head_dim).split([heads, kv_heads, kv_heads], dim=1)
    out = sphinx_kernels.varlen_attention(q, k, v, cu, backend="triton")
    grad = torch.randn_like(out)
    out.backward(grad)
    dense = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    out_dense = sphinx_kernels.varlen_attention(*dense, cu, backend="triton")
    out_dense.backward(grad)
    assert torch.equal(out, out_dense)
    fused_grad = torch.cat([t.grad for t in dense], dim=1).flatten(1)
    assert torch.equal(qkv.grad, fused_grad)


@pytest.mark.parametrize("last_block_first", [False, True])
def test_tile_table_lists_every_block_once(last_block_first):
    lengths = [130, 0, 1, 64, 65]
    tiles = tile_table(cu_seqlens(lengths), 300, 64, 130, last_block_first).cpu()
    assert tiles.shape[0] == min(-(-300 // 64) + 5, 5 * 3)  # the static bound
    real = [(b, i) for b, n in enumerate(lengths) for i in range(-(-n // 64))]
    listed = [tuple(t) for t in tiles.tolist() if t[0] < len(lengths)]
    assert sorted(listed) == real
    assert all(t[0] == len(lengths) for t in tiles.tolist()[len(real):])  # idle tiles last
    assert listed[0] == ((0, 2) if last_block_first else (0, 0))


def test_empty_inputs():
    for backend in BACKENDS:
        q = torch.randn(0, 2, 16, device=DEVICE, requires_grad=True)
        cu = torch.zeros(3, dtype=torch.int32, device=DEVICE)
        out = sphinx_kernels.varlen_attention(q, q, q, cu, backend=backend)
        out.sum().backward()
        assert out.shape == (0, 2, 16) and q.grad.shape == (0, 2, 16)
        no_seqs = sphinx_kernels.varlen_attention(torch.ones(4, 1, 16, device=DEVICE),
                                                  torch.ones(4, 1, 16, device=DEVICE),
                                                  torch.ones(4, 1, 16, device=DEVICE),
                                                  torch.zeros(1, dtype=torch.int32, device=DEVICE),
                                                  backend=backend)
        assert torch.equal(no_seqs, torch.zeros_like(no_seqs))


# --------------------------------------------------------------------------------------------------
# Selection, bad inputs, opcheck, compile.


def test_torch_flash_declares_what_it_cannot_serve():
    def request(**features):
        base = {"head_dim": 64, "causal": True, "prefix": False, "max_seqlen": True,
                "deterministic": False}
        return VARLEN_ATTENTION_BACKENDS.request("cuda", torch.bfloat16, **{**base, **features})

    assert VARLEN_ATTENTION_BACKENDS["torch_flash"].check(request()) == []
    assert "prefix" in " ".join(VARLEN_ATTENTION_BACKENDS["torch_flash"].check(request(prefix=True)))
    assert "max_seqlen" in " ".join(VARLEN_ATTENTION_BACKENDS["torch_flash"].check(request(max_seqlen=False)))
    assert "atomic" in " ".join(VARLEN_ATTENTION_BACKENDS["torch_flash"].check(request(deterministic=True)))
    assert "multiple of 8" in " ".join(VARLEN_ATTENTION_BACKENDS["torch_flash"].check(request(head_dim=20)))
    if DEVICE.type == "cpu":
        with pytest.raises(sphinx_kernels.BackendUnavailableError, match="torch_flash"):
            sphinx_kernels.varlen_attention(torch.ones(2, 1, 8), torch.ones(2, 1, 8),
                                            torch.ones(2, 1, 8), cu_seqlens([2]),
                                            backend="torch_flash")


def test_flash_attn_serves_deterministic_and_declares_the_rest():
    request = lambda **features: VARLEN_ATTENTION_BACKENDS.request(  # noqa: E731
        "cuda", torch.bfloat16, **{"head_dim": 64, **features})
    assert VARLEN_ATTENTION_BACKENDS["flash_attn"].check(request(deterministic=True)) == []
    assert "prefix" in " ".join(VARLEN_ATTENTION_BACKENDS["flash_attn"].check(request(prefix=True)))
    assert "max_seqlen" in " ".join(VARLEN_ATTENTION_BACKENDS["flash_attn"].check(request(max_seqlen=False)))
    assert "multiple of 8" in " ".join(VARLEN_ATTENTION_BACKENDS["flash_attn"].check(request(head_dim=20)))


# Stand-ins for flash-attn 2.8's varlen ops: custom ops with its schemas (names, defaults, which
# arguments it mutates), computing with the reference on the CPU. Like flash-attn they leave the
# output's padding rows unwritten (NaN here) and write gradients into the dq, dk, dv they are handed.
_FLASH_CALLS = {}


@torch.library.custom_op("sphinx_kernels_tests::flash_varlen_forward",
                         mutates_args=("q", "k", "v"))
def _flash_varlen_forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float,
        softmax_scale: float, causal: bool, window_size_left: int = -1, window_size_right: int = -1,
        softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None, return_softmax: bool = False,
        block_table: torch.Tensor | None = None, leftpad_k: torch.Tensor | None = None,
        seqused_k: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _FLASH_CALLS["forward"] = (max_seqlen_q, max_seqlen_k, dropout_p, window_size_left,
                               window_size_right, softcap)
    out, lse = varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal,
                                          softmax_scale=softmax_scale)
    out[int(cu_seqlens_q[-1]):] = float("nan")
    return out, lse, q.new_empty(0), torch.zeros(2, dtype=torch.int64)


@torch.library.custom_op("sphinx_kernels_tests::flash_varlen_backward",
                         mutates_args=("dq", "dk", "dv"))
def _flash_varlen_backward(
        dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
        softmax_lse: torch.Tensor, dq: torch.Tensor | None, dk: torch.Tensor | None,
        dv: torch.Tensor | None, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
        max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, softmax_scale: float, causal: bool,
        window_size_left: int, window_size_right: int, softcap: float,
        alibi_slopes: torch.Tensor | None, deterministic: bool,
        rng_state: torch.Tensor | None = None) -> torch.Tensor:
    _FLASH_CALLS["backward"] = (dropout_p, window_size_left, window_size_right, softcap,
                                deterministic)
    grads = varlen_attention_backward_reference(dout, q, k, v, out, softmax_lse, cu_seqlens_q,
                                          cu_seqlens_k, None, max_seqlen_q, max_seqlen_k, causal,
                                          softmax_scale, deterministic)
    for into, grad, cu in zip((dq, dk, dv), grads, (cu_seqlens_q, cu_seqlens_k, cu_seqlens_k)):
        into[:int(cu[-1])] = grad[:int(cu[-1])]
    return softmax_lse.new_empty(0)


def _flash_stand_ins():
    ops = torch.ops.sphinx_kernels_tests
    return ops.flash_varlen_forward, ops.flash_varlen_backward


@pytest.mark.parametrize("deterministic", [False, True])
def test_flash_attn_glue_against_stand_ins_with_its_schemas(monkeypatch, deterministic):
    """The flash_attn backend's glue on the CPU against the stand-ins above: its calls bind to
    flash-attn's schemas, padding rows come back zero, the gradients are the reference's, and the
    deterministic flag reaches the backward. The real ops run in the gpu tests when installed."""
    case = Case(config_seed=3, dtype=torch.float32, separate_keys=True,
                first_lens_q=(7, 59), first_lens_k=(59, 7))
    monkeypatch.setattr(flash_attn, "flash_attn_ops", _flash_stand_ins)
    impl = VARLEN_ATTENTION_BACKENDS["flash_attn"].impl
    cu_k, scale = case.cu_k, 0.3
    args = (case.cu_q, cu_k, None, max(case.lens_q), max(case.lens_k), True, scale, deterministic)
    out, lse = impl.forward(case.q, case.k, case.v, *args)
    grads = impl.backward(case.grad, case.q, case.k, case.v, out, lse, *args)
    expected_out, _ = varlen_attention_reference(case.q, case.k, case.v, case.cu_q, cu_k,
                                                 softmax_scale=scale)
    expected_grads = varlen_attention_backward_reference(case.grad, case.q, case.k, case.v, out, lse,
                                                   *args)
    assert torch.equal(out, expected_out), case.describe()  # padding rows zeroed, no NaN
    for name, grad, expected in zip("qkv", grads, expected_grads):
        assert torch.equal(grad, expected), f"d{name} {case.describe()}"
    assert _FLASH_CALLS["forward"] == (max(case.lens_q), max(case.lens_k), 0.0, -1, -1, 0.0)
    assert _FLASH_CALLS["backward"] == (0.0, -1, -1, 0.0, deterministic)


def test_flash_attn_is_declared_missing_when_its_ops_lack_an_argument(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: object())
    monkeypatch.setattr(flash_attn, "flash_attn_ops", _flash_stand_ins)
    assert flash_attn.flash_attn_missing(torch.device("cuda")) is None
    # torch's own FlashAttention ops name their arguments differently (is_causal, scale, ...).
    aten = torch.ops.aten
    monkeypatch.setattr(flash_attn, "flash_attn_ops", lambda: (aten._flash_attention_forward,
                                                            aten._flash_attention_backward))
    why = flash_attn.flash_attn_missing(torch.device("cuda"))
    assert why is not None and "causal" in why and "softmax_scale" in why


def _bad(**changes):
    """(q, k, v, cu_seqlens_q) plus keyword arguments with ``changes`` applied."""
    def make():
        q = torch.randn(10, 4, 16, device=DEVICE)
        k = torch.randn(10, 2, 16, device=DEVICE)
        args = dict(q=q, k=k, v=k.clone(), cu_seqlens_q=cu_seqlens([3, 0, 6]))
        args.update({name: change(args) if callable(change) else change
                     for name, change in changes.items()})
        return args
    return make


I32 = torch.int32
BAD_INPUTS = [
    (_bad(q=lambda a: a["q"].long()), TypeError, "q must have dtype"),
    (_bad(q="not a tensor"), TypeError, "q must be a torch.Tensor"),
    (_bad(k=lambda a: a["k"].half()), TypeError, "k has dtype float16 but q has float32"),
    (_bad(q=lambda a: a["q"][0]), ValueError, "q must be 3-D"),
    (_bad(v=lambda a: a["v"][:, :1]), ValueError, "v must have the shape of k"),
    (_bad(k=lambda a: a["k"][..., :8], v=lambda a: a["v"][..., :8]), ValueError,
     "must have q's head dim 16"),
    (_bad(k=lambda a: torch.randn(10, 3, 16, device=DEVICE),
          v=lambda a: torch.randn(10, 3, 16, device=DEVICE)), ValueError,
     "must be a positive multiple of k's"),
    (_bad(q=lambda a: torch.randn(10, 4, 300, device=DEVICE)), ValueError, "head dim"),
    (_bad(q=lambda a: a["q"].transpose(0, 2).contiguous().transpose(0, 2)), ValueError,
     "q must have unit stride"),
    (_bad(k=lambda a: a["k"][:9], v=lambda a: a["v"][:9]), ValueError, "without cu_seqlens_k"),
    (_bad(cu_seqlens_q=lambda a: a["cu_seqlens_q"].long()), TypeError, "cu_seqlens_q must have dtype"),
    (_bad(cu_seqlens_q=torch.tensor([], dtype=I32)), ValueError, "cu_seqlens_q must have B + 1"),
    (_bad(cu_seqlens_k=torch.tensor([0, 4], dtype=I32)), ValueError, "cu_seqlens_k has 2 entries"),
    (_bad(cu_seqlens_q=torch.tensor([1, 3, 9], dtype=I32)), ValueError, "cu_seqlens_q[0] must be 0"),
    (_bad(cu_seqlens_q=torch.tensor([0, 5, 3, 9], dtype=I32)), ValueError, "must be non-decreasing"),
    (_bad(cu_seqlens_q=torch.tensor([0, 5, 11], dtype=I32)), ValueError,
     "cu_seqlens_q[-1] = 11 exceeds the 10 rows of q"),
    (_bad(cu_seqlens_k=torch.tensor([0, 5, 6, 12], dtype=I32)), ValueError,
     "exceeds the 10 rows of k and v"),
    (_bad(prefix_lens=torch.tensor([1, 0, 2], dtype=I32), causal=False), ValueError,
     "prefix_lens applies to causal attention only"),
    (_bad(prefix_lens=torch.tensor([1, 0], dtype=I32)), ValueError, "prefix_lens must be [B] = [3]"),
    (_bad(prefix_lens=torch.tensor([1, 0, 2])), TypeError, "prefix_lens must have dtype int32"),
    (_bad(prefix_lens=torch.tensor([4, 0, 2], dtype=I32)), ValueError,
     "prefix_lens[0] = 4 must be in [0, 3]"),
    (_bad(prefix_lens=torch.tensor([0, 0, -1], dtype=I32)), ValueError, "prefix_lens[2] = -1"),
    (_bad(max_seqlen_q=5), ValueError, "max_seqlen_q = 5 is below the longest sequence (6)"),
    (_bad(max_seqlen_k=2.0), TypeError, "max_seqlen_k must be None or an int"),
    (_bad(softmax_scale="0.1"), TypeError, "softmax_scale must be None or a float"),
    (_bad(cu_seqlens_q=lambda a: a["cu_seqlens_q"].to("meta")), ValueError, "cu_seqlens_q is on meta"),
]


@pytest.mark.parametrize("make_bad,error,message", BAD_INPUTS)
@pytest.mark.usefixtures("value_checks_on")
def test_bad_input_raises_naming_the_argument(make_bad, error, message):
    with pytest.raises(error, match=re.escape(message)):
        sphinx_kernels.varlen_attention(**make_bad())


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    lens_q, lens_k = [5, 0, 9], [7, 1, 9]
    q = torch.randn(16, 2, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(18, 1, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(18, 1, 16, device=DEVICE, requires_grad=True)
    prefix = torch.tensor([2, 1, 4], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(torch.ops.sphinx_kernels.varlen_attention.default, (q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k),
                                                 prefix, 9, 9, True, 0.3, False, backend))


def test_compiles_with_fullgraph_forward_and_backward():
    case = Case(config_seed=21, dtype=torch.float32, mode="prefix", max_seqs=3,
                lengths=(0, 1, 7, 40), head_dims=(16,))

    def loss(q, k, v, cu, prefix):
        return (sphinx_kernels.varlen_attention(q, k, v, cu, prefix_lens=prefix) * 2).sum()

    inputs = [t.detach().requires_grad_() for t in (case.q, case.k, case.v)]
    torch.compile(loss, fullgraph=True)(*inputs, case.cu_q, case.prefix).backward()
    compiled = [t.grad for t in inputs]
    eager = [t.detach().requires_grad_() for t in (case.q, case.k, case.v)]
    loss(*eager, case.cu_q, case.prefix).backward()
    assert all(torch.equal(a, b.grad) for a, b in zip(compiled, eager)), case.describe()


# --------------------------------------------------------------------------------------------------
# GPU: real sizes in bf16 (skipped without a GPU).


def real_size_lengths(total=16384, longest=4096, seed=0):
    """Lengths from 1 to ``longest`` summing to ``total``."""
    rng = random.Random(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(min(rng.randint(1, longest), total - sum(lengths)))
    return lengths


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ("causal", "prefix"))
def test_gpu_real_size_bf16(mode):
    """16k tokens, lengths 1 to 4096, D = 128, 32 query and 8 kv heads, bf16: Triton (and torch_flash
    where it serves) against the float32 reference by the tolerance rule; Triton also within 2x
    (3x for gradients) of torch_flash's own error."""
    case = Case(config_seed=0, dtype=torch.bfloat16, mode="causal", max_seqs=1, lengths=(0,),
                head_dims=(128,))
    lengths = real_size_lengths()
    gen = torch.Generator(device="cuda").manual_seed(case.seed)
    case.lens_q = case.lens_k = lengths
    case.cu_q, case.cu_k = cu_seqlens(lengths), None
    case.heads, case.kv_heads = 32, 8
    case.q, case.grad = (torch.randn(16384, 32, 128, device="cuda", generator=gen).bfloat16()
                         for _ in "qg")
    case.k, case.v = (torch.randn(16384, 8, 128, device="cuda", generator=gen).bfloat16()
                      for _ in "kv")
    if mode == "prefix":
        case.prefix = torch.tensor([n // 3 for n in lengths], dtype=torch.int32, device="cuda")
    out, grads = case.run("triton")
    out32, grads32 = case.run_reference(torch.float32)
    out_same, grads_same = case.run_reference(torch.bfloat16)
    what = f"triton bf16 {mode}"
    assert_within_torch_error(out, out32, out_same, FORWARD_FACTOR, f"out, {what}")
    for name, grad, grad32, same in zip("qkv", grads, grads32, grads_same):
        assert_within_torch_error(grad, grad32, same, GRADIENT_FACTOR, f"d{name}, {what}")
    if mode == "causal" and "torch_flash" in runnable_backends(torch.bfloat16):
        flash_out, flash_grads = case.run("torch_flash", max_seqlen_q=max(lengths),
                                          max_seqlen_k=max(lengths))
        assert_within_torch_error(flash_out, out32, out_same, FORWARD_FACTOR, "torch_flash out")
        assert_within_torch_error(out, out32, flash_out, FORWARD_FACTOR, "triton vs torch_flash out")
        for name, grad, flash, grad32 in zip("qkv", grads, flash_grads, grads32):
            assert_within_torch_error(grad, grad32, flash, GRADIENT_FACTOR,
                                      f"triton vs torch_flash d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", *FLASH_PEERS])
def test_gpu_bottom_right_with_separate_keys_bf16(backend):
    """Checks the FlashAttention-2 peers' causal alignment too: they serve cu_seqlens_k !=
    cu_seqlens_q only because FlashAttention-2 aligns bottom-right; this fails if they ever do not."""
    if backend not in runnable_backends(torch.bfloat16):
        pytest.skip(f"{backend} does not serve bf16 here")
    case = Case(config_seed=1, dtype=torch.bfloat16, mode="causal", separate_keys=True,
                head_dims=(64, 128), first_lens_q=(7, 300, 1), first_lens_k=(500, 100, 0))
    kwargs = dict(max_seqlen_q=max(case.lens_q), max_seqlen_k=max(case.lens_k))
    out, grads = case.run(backend, **kwargs)
    out32, grads32 = case.run_reference(torch.float32)
    out_same, grads_same = case.run_reference(torch.bfloat16)
    assert_within_torch_error(out, out32, out_same, FORWARD_FACTOR, f"{backend} out")
    for name, grad, grad32, same in zip("qkv", grads, grads32, grads_same):
        assert_within_torch_error(grad, grad32, same, GRADIENT_FACTOR, f"{backend} d{name}")
