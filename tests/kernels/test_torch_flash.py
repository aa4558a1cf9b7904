"""The ``torch_flash`` backend of varlen_attention (torch's bundled FlashAttention-2): what it
declares it cannot serve, here; its numbers against the reference run in test_varlen_attention.py on
a GPU."""
from dataclasses import replace

import pytest
import torch

import sphinx_kernels
from sphinx_kernels.ops.varlen_attention import VARLEN_ATTENTION_BACKENDS
from tests.kernels.attention_cases import DEVICE, cu_seqlens


def test_torch_flash_declares_what_it_cannot_serve():
    def reasons(**features):
        request = VARLEN_ATTENTION_BACKENDS.request("cuda", torch.bfloat16, head_dim=64)
        backend = VARLEN_ATTENTION_BACKENDS["torch_flash"]
        return " ".join(backend.check(replace(request, **features)))

    assert reasons() == ""
    assert "prefix" in reasons(prefix=True)
    assert "max_seqlen" in reasons(max_seqlen=False)
    assert "atomic" in reasons(deterministic=True)
    assert "multiple of 8" in reasons(head_dim=20)
    assert "at most 256" in reasons(head_dim=264)
    if DEVICE.type == "cpu":
        with pytest.raises(sphinx_kernels.BackendUnavailableError, match="torch_flash"):
            sphinx_kernels.varlen_attention(torch.ones(2, 1, 8), torch.ones(2, 1, 8),
                                            torch.ones(2, 1, 8), cu_seqlens([2]),
                                            backend="torch_flash")
