"""The ``torch_cpu_flash`` backend of varlen_attention (torch's CPU flash attention, per sequence;
single-row sequences batched): where it runs, decode rows in several batches, and a
bitwise-repeatable backward; its numbers against the float64 reference run with every other
backend's in test_varlen_attention.py."""
import pytest
import torch

import sphinx_kernels
from sphinx_kernels.ops.varlen_attention import (
    VARLEN_ATTENTION_BACKENDS,
    varlen_attention_reference,
)
from tests.kernels.attention_cases import Case


def test_serves_every_cpu_request_and_no_gpu_one():
    backend = VARLEN_ATTENTION_BACKENDS["torch_cpu_flash"]
    for prefix in (False, True):
        for deterministic in (False, True):
            request = VARLEN_ATTENTION_BACKENDS.request("cpu", torch.float32, head_dim=72,
                                                        prefix=prefix, max_seqlen=False,
                                                        deterministic=deterministic)
            assert backend.not_supported_reasons(request) == []
    cuda = VARLEN_ATTENTION_BACKENDS.request("cuda", torch.bfloat16, head_dim=64)
    assert "runs on cpu" in " ".join(backend.not_supported_reasons(cuda))


@pytest.mark.parametrize("mode", ("causal", "prefix"))
def test_backward_is_bitwise_repeatable(mode, seed):
    case = Case(config_seed=5, dtype=torch.float32, mode=mode, separate_keys=True,
                first_lens_q=(9, 3), first_lens_k=(4, 3), seed=seed)
    grads = []
    for _ in range(2):
        q, k, v = (t.clone().requires_grad_() for t in (case.q, case.k, case.v))
        out = sphinx_kernels.varlen_attention(q, k, v, case.cu_q, case.cu_k, causal=case.causal,
                                              prefix_lens=case.prefix, deterministic=True,
                                              backend="torch_cpu_flash")
        out.backward(case.grad)
        grads.append((out, q.grad, k.grad, v.grad))
    for first, second in zip(*grads):
        assert torch.equal(first, second)


def test_single_row_sequences_of_very_different_lengths(seed):
    """A decode step's single query rows go in batches of similar key lengths: one long cache among
    short ones (8 kv heads of 128: the padding allowance is 1024 rows, so the 3000-key sequence
    cannot pad six short ones and they go in a second batch), next to multi-row sequences, a keyless
    one, padding rows and a strided q; output and log-sum-exp against the float64 reference."""
    gen = torch.Generator().manual_seed(seed)
    lens_q = [1, 1, 4, 1, 1, 0, 1, 1, 1, 1, 3]
    lens_k = [3000, 5, 9, 0, 7, 4, 1, 6, 8, 2, 3]
    cu_q = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k).cumsum(0).to(torch.int32)
    rows_q, rows_k = int(cu_q[-1]) + 2, int(cu_k[-1])
    q = torch.randn(rows_q, 32, 128, generator=gen)[:, ::2]  # 16 heads, strided
    k, v = (torch.randn(rows_k, 8, 128, generator=gen) for _ in "kv")
    for prefix in (None, torch.tensor([2, 0, 3, 0, 1, 0, 0, 6, 0, 0, 3], dtype=torch.int32)):
        out, lse = torch.ops.sphinx_kernels.varlen_attention(
            q, k, v, cu_q, cu_k, prefix, rows_q, rows_k, True, 128 ** -0.5, False,
            "torch_cpu_flash")
        out64, lse64 = varlen_attention_reference(q.double(), k.double(), v.double(), cu_q, cu_k,
                                                  prefix_lens=prefix)
        torch.testing.assert_close(out, out64.float(), rtol=1e-4, atol=1e-5)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(lse64))
        finite = torch.isfinite(lse64)
        torch.testing.assert_close(lse[finite], lse64[finite].float(), rtol=1e-5, atol=1e-5)
