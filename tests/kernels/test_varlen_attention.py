"""varlen_attention on every backend this machine runs: output and gradients within the tolerance
rule (docs/numerics.md) of a float64 reference, the documented masks (bottom-right causal,
prefix-LM), padding and empty sequences, determinism, strided inputs, bad inputs, opcheck and
torch.compile. The FlashAttention-2 peers' glue has its own tests (test_torch_flash.py,
test_flash_attn.py); they run here on a GPU.

Configurations are drawn from the acceptance grid by a seeded sampler (a handful per test: the
Triton interpreter is slow); tensor values from the test's seed (tests/conftest.py).
"""
from __future__ import annotations

import random
import re

import pytest
import torch

import sphinx_kernels
from sphinx_kernels.ops.varlen_attention import (
    VARLEN_ATTENTION_BACKENDS,
    varlen_attention_mask,
    varlen_attention_reference,
)
from sphinx_kernels.triton.varlen_attention import tile_table
from tests.kernels.attention_cases import (
    DEVICE,
    FLASH_PEERS,
    Case,
    assert_matches_float64,
    cu_seqlens,
)
from tests.numerics import FORWARD_FACTOR, GRADIENT_FACTOR, assert_within_torch_error, max_error
from tests.variants import expanded, same_bits, strided

MODES = ("causal", "non-causal", "prefix")


def runnable_backends(dtype=torch.float32):
    return VARLEN_ATTENTION_BACKENDS.available(
        VARLEN_ATTENTION_BACKENDS.request(DEVICE, dtype, head_dim=64))


# Here: triton (interpreted) and reference in float32 and float16; bf16 only on a GPU (the
# interpreter's bf16 arithmetic is wrong, docs/environment.md).
CPU_DTYPES = (torch.float32, torch.float16)
# Every backend here but the FlashAttention-2 peers (the GPU tests below check those).
BACKENDS = [b for b in runnable_backends() if b not in FLASH_PEERS]


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


# ----------------------------------------------------------------------------------------------
# The reference against the definition, and the docstring's drawings.


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("separate_keys", [False, True])
def test_reference_matches_the_definition(mode, separate_keys, seed):
    case = Case(config_seed=11 + MODES.index(mode), dtype=torch.float64, mode=mode,
                separate_keys=separate_keys, max_seqs=4, lengths=(0, 1, 5, 9, 13), seed=seed)
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


# ----------------------------------------------------------------------------------------------
# Every backend against float64, by the tolerance rule.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_output_and_gradients_within_tolerance(backend, dtype, mode, seed):
    # One sampled configuration per (dtype, mode), the same for every backend.
    case = Case(config_seed=100 * CPU_DTYPES.index(dtype) + MODES.index(mode), dtype=dtype,
                mode=mode, seed=seed)
    assert_matches_float64(case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("mode", ("causal", "prefix"))
def test_bottom_right_causal_with_separate_keys(backend, dtype, mode, seed):
    """cu_seqlens_k != cu_seqlens_q: more keys than queries (a KV cache), fewer (rows that see
    nothing), and none."""
    case = Case(config_seed=7 + CPU_DTYPES.index(dtype), dtype=dtype, mode=mode, separate_keys=True,
                max_seqs=5, first_lens_q=(7, 59, 3), first_lens_k=(59, 7, 0), seed=seed)
    assert_matches_float64(case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_decode_rows_one_query_per_sequence(backend, mode, seed):
    """A decode step: one query row per sequence against its cached keys, grouped-query heads (2
    query heads per kv head here): the last row sees every key whatever the mode."""
    case = Case(config_seed=6, dtype=torch.float32, mode=mode, separate_keys=True, max_seqs=4,
                first_lens_q=(1, 1, 1, 1), first_lens_k=(1, 6, 40, 17), seed=seed)
    assert case.heads == 2 * case.kv_heads
    assert_matches_float64(case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_rows_and_keyless_rows_are_zero_without_nan(backend):
    # Sequence 0 has no keys, sequence 2 has rows above the diagonal.
    lens_q, lens_k = [3, 0, 5, 4], [0, 2, 2, 6]
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    q = torch.randn(15, 4, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(13, 2, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(13, 2, 16, device=DEVICE, requires_grad=True)
    out, lse = torch.ops.sphinx_kernels.varlen_attention(q, k, v, cu_q, cu_k, None, 15, 13, True,
                                                         0.25, False, backend)
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
def test_lse_matches_float64(backend, seed):
    case = Case(config_seed=5, dtype=torch.float32, mode="prefix", separate_keys=True, max_seqs=4,
                seed=seed)
    _, lse = torch.ops.sphinx_kernels.varlen_attention(
        case.q, case.k, case.v, case.cu_q, case.cu_k, case.prefix, case.q.shape[0],
        case.k.shape[0], True, case.head_dim ** -0.5, False, backend)
    _, lse64 = varlen_attention_reference(case.q.double(), case.k.double(), case.v.double(),
                                          case.cu_q, case.cu_k, **case.kwargs())
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse64)), case.describe()
    finite = torch.isfinite(lse64)
    torch.testing.assert_close(lse[finite].double(), lse64[finite], rtol=1e-5, atol=1e-5,
                               msg=case.describe)


def test_deterministic_backward_is_bitwise_repeatable(seed):
    case = Case(config_seed=3, dtype=torch.float16, mode="prefix", max_seqs=4, seed=seed)
    first, again = (case.run("triton", deterministic=True) for _ in "12")
    assert all(torch.equal(a, b) for a, b in zip(first, again)), case.describe()


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_tensors_of_any_strides(backend, seed):
    """cu_seqlens_q, cu_seqlens_k and prefix_lens as strided views (2^30 in the gaps) and as
    expanded (stride-0) views: the output and gradients of contiguous copies, bit for bit (the
    Triton kernels once read them as contiguous)."""
    case = Case(config_seed=4, dtype=torch.float32, mode="prefix", separate_keys=True, max_seqs=5,
                seed=seed)
    expected = case.run(backend)
    case.cu_q, case.cu_k, case.prefix = (strided(t) for t in (case.cu_q, case.cu_k, case.prefix))
    assert all(same_bits(a, b) for a, b in zip(case.run(backend), expected)), case.describe()
    # Stride 0: no keys anywhere (every output row sees nothing) and one shared prefix length.
    num_seqs = case.prefix.shape[0]
    case.cu_k = expanded(torch.zeros(1, dtype=torch.int32, device=DEVICE), num_seqs + 1)
    case.prefix = expanded(torch.zeros(1, dtype=torch.int32, device=DEVICE), num_seqs)
    got = case.run(backend)
    case.cu_k, case.prefix = case.cu_k.contiguous(), case.prefix.contiguous()
    assert all(same_bits(a, b) for a, b in zip(got, case.run(backend))), case.describe()


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


# ----------------------------------------------------------------------------------------------
# Bad inputs, opcheck, compile.


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
    (_bad(cu_seqlens_q=lambda a: a["cu_seqlens_q"].long()), TypeError,
     "cu_seqlens_q must have dtype"),
    (_bad(cu_seqlens_q=torch.tensor([], dtype=I32)), ValueError, "cu_seqlens_q must have B + 1"),
    (_bad(cu_seqlens_k=torch.tensor([0, 4], dtype=I32)), ValueError, "cu_seqlens_k has 2 entries"),
    (_bad(cu_seqlens_q=torch.tensor([1, 3, 9], dtype=I32)), ValueError,
     "cu_seqlens_q[0] must be 0"),
    (_bad(cu_seqlens_q=torch.tensor([0, 5, 3, 9], dtype=I32)), ValueError,
     "must be non-decreasing"),
    (_bad(cu_seqlens_q=torch.tensor([0, 5, 11], dtype=I32)), ValueError,
     "cu_seqlens_q[-1] = 11 exceeds the 10 rows of q"),
    (_bad(cu_seqlens_k=torch.tensor([0, 5, 6, 12], dtype=I32)), ValueError,
     "exceeds the 10 rows of k and v"),
    (_bad(prefix_lens=torch.tensor([1, 0, 2], dtype=I32), causal=False), ValueError,
     "prefix_lens applies to causal attention only"),
    (_bad(prefix_lens=torch.tensor([1, 0], dtype=I32)), ValueError,
     "prefix_lens must be [B] = [3]"),
    (_bad(prefix_lens=torch.tensor([1, 0, 2])), TypeError, "prefix_lens must have dtype int32"),
    (_bad(prefix_lens=torch.tensor([4, 0, 2], dtype=I32)), ValueError,
     "prefix_lens[0] = 4 must be in [0, 3]"),
    (_bad(prefix_lens=torch.tensor([0, 0, -1], dtype=I32)), ValueError, "prefix_lens[2] = -1"),
    (_bad(max_seqlen_q=5), ValueError, "max_seqlen_q = 5 is below the longest sequence (6)"),
    (_bad(max_seqlen_k=2.0), TypeError, "max_seqlen_k must be None or an int"),
    (_bad(softmax_scale="0.1"), TypeError, "softmax_scale must be None or a float"),
    (_bad(softmax_scale=10**400), ValueError, "softmax_scale must be a finite float"),
    (_bad(softmax_scale=float("nan")), ValueError, "softmax_scale must be a finite float"),
    (_bad(causal=None), TypeError, "causal must be a bool, got NoneType"),
    (_bad(causal=1), TypeError, "causal must be a bool, got int"),
    (_bad(deterministic="yes"), TypeError, "deterministic must be a bool, got str"),
    (_bad(cu_seqlens_q=lambda a: a["cu_seqlens_q"].to("meta")), ValueError,
     "cu_seqlens_q is on meta"),
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
    torch.library.opcheck(torch.ops.sphinx_kernels.varlen_attention.default,
                          (q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), prefix, 9, 9, True, 0.3,
                           False, backend))


def test_compiles_with_fullgraph_forward_and_backward(seed):
    case = Case(config_seed=21, dtype=torch.float32, mode="prefix", max_seqs=3,
                lengths=(0, 1, 7, 40), head_dims=(16,), seed=seed)

    def loss(q, k, v, cu, prefix):
        return (sphinx_kernels.varlen_attention(q, k, v, cu, prefix_lens=prefix) * 2).sum()

    inputs = [t.detach().requires_grad_() for t in (case.q, case.k, case.v)]
    torch.compile(loss, fullgraph=True)(*inputs, case.cu_q, case.prefix).backward()
    compiled = [t.grad for t in inputs]
    eager = [t.detach().requires_grad_() for t in (case.q, case.k, case.v)]
    loss(*eager, case.cu_q, case.prefix).backward()
    assert all(torch.equal(a, b.grad) for a, b in zip(compiled, eager)), case.describe()


# ----------------------------------------------------------------------------------------------
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
    """16k tokens, lengths 1 to 4096, D = 128, 32 query and 8 kv heads, bf16: Triton (and
    torch_flash where it serves) against the float64 reference by the tolerance rule; Triton also
    within 2x (3x for gradients) of torch_flash's own error."""
    case = Case(config_seed=0, dtype=torch.bfloat16, mode="causal", max_seqs=1, lengths=(0,),
                head_dims=(128,))
    lengths = real_size_lengths()
    case.lens_q = case.lens_k = lengths
    case.cu_q, case.cu_k = cu_seqlens(lengths), None
    case.heads, case.kv_heads = 32, 8
    case.shapes = ((16384, 32, 128), (16384, 8, 128))
    case.q, case.k, case.v, case.grad = case.draw(torch.Generator().manual_seed(0))
    if mode == "prefix":
        case.prefix = torch.tensor([n // 3 for n in lengths], dtype=torch.int32, device="cuda")
    assert_matches_float64(case, "triton")
    if mode == "causal" and "torch_flash" in runnable_backends(torch.bfloat16):
        # torch's own FlashAttention-2 by the same rule, and Triton within the rule of its error.
        assert_matches_float64(case, "torch_flash", max_seqlen_q=max(lengths),
                               max_seqlen_k=max(lengths))
        exact = [e for _, e in case.reference_pairs()]
        flash = case.run("torch_flash", max_seqlen_q=max(lengths), max_seqlen_k=max(lengths))
        for name, got, peer, reference, factor in zip(
                ("out", "dq", "dk", "dv"), case.run("triton"), flash, exact,
                (FORWARD_FACTOR,) + (GRADIENT_FACTOR,) * 3):
            assert_within_torch_error(got, reference, max_error(peer, reference), factor,
                                      f"triton vs torch_flash {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", *FLASH_PEERS])
def test_gpu_bottom_right_with_separate_keys_bf16(backend):
    """Checks the FlashAttention-2 peers' causal alignment too: they serve cu_seqlens_k !=
    cu_seqlens_q only because FlashAttention-2 aligns bottom-right; this fails if they ever do
    not."""
    if backend not in runnable_backends(torch.bfloat16):
        pytest.skip(f"{backend} does not serve bf16 here")
    case = Case(config_seed=1, dtype=torch.bfloat16, mode="causal", separate_keys=True,
                head_dims=(64, 128), first_lens_q=(7, 300, 1), first_lens_k=(500, 100, 0))
    assert_matches_float64(case, backend, max_seqlen_q=max(case.lens_q),
                           max_seqlen_k=max(case.lens_k))
