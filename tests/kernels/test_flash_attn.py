"""The ``flash_attn`` backend of varlen_attention (flash-attn's FlashAttention-2): what it serves
and declares, and its glue run on the CPU against stand-ins with flash-attn's own op schemas (the
real ops run in test_varlen_attention.py's GPU tests when flash-attn is installed)."""
from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch

from sphinx_kernels.ops import flash_attn
from sphinx_kernels.ops.varlen_attention import (
    VARLEN_ATTENTION_BACKENDS,
    varlen_attention_backward_reference,
    varlen_attention_reference,
)
from tests.kernels.attention_cases import Case


def test_flash_attn_serves_deterministic_and_declares_the_rest():
    def reasons(**features):
        request = VARLEN_ATTENTION_BACKENDS.request("cuda", torch.bfloat16, head_dim=64)
        return " ".join(VARLEN_ATTENTION_BACKENDS["flash_attn"].check(replace(request, **features)))

    assert reasons(deterministic=True) == ""
    assert "prefix" in reasons(prefix=True)
    assert "max_seqlen" in reasons(max_seqlen=False)
    assert "multiple of 8" in reasons(head_dim=20)


# Stand-ins for flash-attn 2.8's varlen ops: custom ops with its schemas (names, defaults, which
# arguments it mutates), computing with the reference on the CPU. Like flash-attn they leave the
# output's padding rows unwritten (NaN here) and write gradients into the dq, dk, dv they are
# handed.
_FLASH_CALLS = {}


@torch.library.custom_op("sphinx_kernels_tests::flash_varlen_forward",
                         mutates_args=("q", "k", "v"))
def _flash_varlen_forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float,
        softmax_scale: float, causal: bool, window_size_left: int = -1, window_size_right: int = -1,
        softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
        return_softmax: bool = False, block_table: torch.Tensor | None = None,
        leftpad_k: torch.Tensor | None = None, seqused_k: torch.Tensor | None = None
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
def test_flash_attn_glue_against_stand_ins_with_its_schemas(monkeypatch, deterministic, seed):
    """The flash_attn backend's glue on the CPU against the stand-ins above: its calls bind to
    flash-attn's schemas, padding rows come back zero, the gradients are the reference's, and the
    deterministic flag reaches the backward. The real ops run in the gpu tests when installed."""
    case = Case(config_seed=3, dtype=torch.float32, separate_keys=True,
                first_lens_q=(7, 59), first_lens_k=(59, 7), seed=seed)
    monkeypatch.setattr(flash_attn, "flash_attn_ops", _flash_stand_ins)
    impl = VARLEN_ATTENTION_BACKENDS["flash_attn"].impl
    cu_k, scale = case.cu_k, 0.3
    args = (case.cu_q, cu_k, None, max(case.lens_q), max(case.lens_k), True, scale, deterministic)
    out, lse = impl.forward(case.q, case.k, case.v, *args)
    grads = impl.backward(case.grad, case.q, case.k, case.v, out, lse, *args)
    expected_out, _ = varlen_attention_reference(case.q, case.k, case.v, case.cu_q, cu_k,
                                                 softmax_scale=scale)
    expected_grads = varlen_attention_backward_reference(case.grad, case.q, case.k, case.v, out,
                                                         lse, *args)
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
