"""The ``torch_cpu_flash`` backend of varlen_attention (torch's CPU flash attention, per sequence):
where it runs, and a bitwise-repeatable backward; its numbers against the float64 reference run with
every other backend's in test_varlen_attention.py."""
import pytest
import torch

import sphinx_kernels
from sphinx_kernels.ops.varlen_attention import VARLEN_ATTENTION_BACKENDS
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
