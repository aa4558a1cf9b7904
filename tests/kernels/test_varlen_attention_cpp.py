"""The ``cpp`` backend of varlen_attention (csrc/varlen/attention_cpu.cpp: the CPU forward of decode
steps, its backward torch's CPU flash kernel from the kernel's out and lse): chosen for decode calls
only; its kernel within the tolerance rule of the float64 reference on every mask and dtype (through
the custom op, which takes any backend by name); a KV-cache decode step through the public op, the
cache's unused rows never read; and the raw op's own guards."""
import pytest
import torch

import sphinx_kernels
from sphinx_kernels.ops.varlen_attention import (
    VARLEN_ATTENTION_BACKENDS,
    varlen_attention_reference,
)
from tests.kernels.attention_cases import Case
from tests.numerics import FORWARD_FACTOR, GRADIENT_FACTOR, assert_all_within_torch_error

DECODE = VARLEN_ATTENTION_BACKENDS.request("cpu", torch.float32, head_dim=64, decode=True)
pytestmark = pytest.mark.skipif(
    not VARLEN_ATTENTION_BACKENDS["cpp"].supports(DECODE),
    reason="sphinx_kernels._C is not built")


def run_custom_op(case: Case, values=None):
    """``[out, dq, dk, dv]`` of the custom op on the cpp backend (any query lengths)."""
    q, k, v, grad = values or (case.q, case.k, case.v, case.grad)
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    cu_k = case.cu_q if case.cu_k is None else case.cu_k
    out, _ = torch.ops.sphinx_kernels.varlen_attention(
        *inputs, case.cu_q, cu_k, case.prefix, q.shape[0], k.shape[0], case.causal,
        case.head_dim ** -0.5, False, "cpp")
    out.backward(grad)
    return [out.detach()] + [t.grad for t in inputs]


def test_chosen_for_decode_calls_only():
    assert VARLEN_ATTENTION_BACKENDS.select(DECODE).name == "cpp"
    blocks = VARLEN_ATTENTION_BACKENDS.request("cpu", torch.float32, head_dim=64, decode=False)
    assert VARLEN_ATTENTION_BACKENDS.select(blocks).name != "cpp"
    assert "decode steps only" in " ".join(VARLEN_ATTENTION_BACKENDS.reasons(blocks)["cpp"])
    gpu = VARLEN_ATTENTION_BACKENDS.request("cuda", torch.bfloat16, head_dim=64, decode=True)
    assert "runs on cpu" in " ".join(VARLEN_ATTENTION_BACKENDS["cpp"].not_supported_reasons(gpu))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ("causal", "non-causal", "prefix"))
def test_matches_float64_on_every_mask(mode, dtype, seed):
    # Chosen first sequences: more queries than keys (keyless rows), no keys, no queries, a
    # decode row, a square block (where a prefix opens keys to the early rows); the rest drawn.
    case = Case(config_seed=11, dtype=dtype, mode=mode, separate_keys=True, max_seqs=7,
                lengths=(0, 1, 5, 23, 40), first_lens_q=(6, 3, 0, 1, 23),
                first_lens_k=(2, 0, 4, 9, 23), seed=seed)
    first = case.reference_pairs()
    assert_all_within_torch_error(
        run_custom_op(case), [exact for _, exact in first],
        lambda gen: case.reference_pairs(case.draw(gen)), torch.Generator().manual_seed(seed),
        [FORWARD_FACTOR] + [GRADIENT_FACTOR] * 3, ["out", "dq", "dk", "dv"],
        f"cpp {dtype} {case.describe()}", first=first)


def test_lse_and_keyless_rows(seed):
    case = Case(config_seed=3, dtype=torch.float32, mode="prefix", separate_keys=True, max_seqs=5,
                lengths=(0, 1, 5, 23), first_lens_q=(5, 1, 2), first_lens_k=(2, 0, 7), seed=seed)
    out, lse = torch.ops.sphinx_kernels.varlen_attention(
        case.q, case.k, case.v, case.cu_q, case.cu_k, case.prefix, case.q.shape[0],
        case.k.shape[0], True, case.head_dim ** -0.5, False, "cpp")
    _, lse64 = varlen_attention_reference(case.q.double(), case.k.double(), case.v.double(),
                                          case.cu_q, case.cu_k, **case.kwargs())
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse64)), case.describe()
    finite = torch.isfinite(lse64)
    torch.testing.assert_close(lse[finite].double(), lse64[finite], rtol=1e-5, atol=1e-5)
    keyless = torch.isneginf(lse64).all(0)  # rows that see no key, and the padding rows
    assert keyless.any() and torch.equal(out[keyless], torch.zeros_like(out[keyless]))


def test_decode_step_of_a_kv_cache(seed):
    """A step as sphinx_model.generate makes it: per live sequence a gap (no query rows) and one
    query row against its cache slot's filled rows, one padding row; prefixes; q a strided view of
    a fused projection; the offsets also as strided views. The slots' unused rows hold NaN: a
    kernel reading them would give NaN."""
    gen = torch.Generator().manual_seed(seed)
    filled, slots = [5, 1, 37, 12], [9, 4, 40, 30]
    starts = torch.tensor([0] + slots[:-1]).cumsum(0).tolist()
    cu_k = [0]
    for start, length in zip(starts, filled):
        cu_k += [start, start + length]
    cu_k = torch.tensor(cu_k, dtype=torch.int32)
    cu_q = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4], dtype=torch.int32)
    prefix = torch.tensor([0, 3, 0, 0, 0, 20, 0, 12], dtype=torch.int32)
    fused = torch.randn(5, 6 + 2 * 3, 24, generator=gen)  # 4 rows + padding: [T, Hq + 2 Hkv, D]
    q = fused[:, :6]
    k, v = (torch.full((sum(slots), 3, 24), float("nan")) for _ in "kv")
    for start, length in zip(starts, filled):
        k[start:start + length] = torch.randn(length, 3, 24, generator=gen)
        v[start:start + length] = torch.randn(length, 3, 24, generator=gen)
    for prefix_lens in (None, prefix):
        out = sphinx_kernels.varlen_attention(q, k, v, cu_q, cu_k, 1, sum(slots),
                                              prefix_lens=prefix_lens)
        forced = sphinx_kernels.varlen_attention(q, k, v, cu_q, cu_k, 1, sum(slots),
                                                 prefix_lens=prefix_lens, backend="cpp")
        assert torch.equal(out, forced)  # the call chose cpp
        expected, _ = varlen_attention_reference(q.double(), k.double(), v.double(), cu_q, cu_k,
                                                 prefix_lens=prefix_lens)
        assert not out.isnan().any() and torch.equal(out[4], torch.zeros_like(out[4]))
        torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-6)
        # Offsets as strided views (every other entry of a wider tensor): the same result.
        strided_q, strided_k = (torch.stack([t, t], 1)[:, 0] for t in (cu_q, cu_k))
        strided = sphinx_kernels.varlen_attention(q, k, v, strided_q, strided_k, 1, sum(slots),
                                                  prefix_lens=prefix_lens)
        assert torch.equal(strided, out)


@pytest.mark.parametrize("bad, message", [
    ({"cu_seqlens_k": [0, 4, 3]}, "non-decreasing"),
    ({"cu_seqlens_k": [0, 2, 9]}, "exceeds the rows"),
    ({"cu_seqlens_q": [1, 1, 2]}, r"\[0\] must be 0"),
    ({"prefix_lens": [3, 0]}, "prefix_lens"),
])
def test_raw_op_guards_its_offsets(bad, message):
    """The compiled op reads rows through the offsets unchecked by Python when called directly:
    it refuses offsets that would read out of bounds."""
    args = {"cu_seqlens_q": [0, 1, 2], "cu_seqlens_k": [0, 2, 5], "prefix_lens": None}
    args.update(bad)
    tensors = {name: None if value is None else torch.tensor(value, dtype=torch.int32)
               for name, value in args.items()}
    q, k = torch.randn(2, 2, 8), torch.randn(5, 1, 8)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.sphinx_kernels.varlen_attention_native(
            q, k, k, tensors["cu_seqlens_q"], tensors["cu_seqlens_k"], tensors["prefix_lens"],
            1, 5, True, 0.3, False)


def test_opcheck():
    """The custom op on the cpp backend (a decode layout: gaps, one query row per sequence, a
    sequence without keys, prefixes): schema, fake tensor and autograd registrations agree."""
    q = torch.randn(3, 2, 16, requires_grad=True)
    k = torch.randn(14, 1, 16, requires_grad=True)
    v = torch.randn(14, 1, 16, requires_grad=True)
    cu_q = torch.tensor([0, 0, 1, 1, 2, 2, 3], dtype=torch.int32)
    cu_k = torch.tensor([0, 2, 7, 7, 7, 9, 14], dtype=torch.int32)
    prefix = torch.tensor([0, 3, 0, 0, 0, 2], dtype=torch.int32)
    torch.library.opcheck(torch.ops.sphinx_kernels.varlen_attention.default,
                          (q, k, v, cu_q, cu_k, prefix, 1, 14, True, 0.3, False, "cpp"))
