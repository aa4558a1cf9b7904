"""``varlen_attention``: flash attention over packed variable-length sequences (causal bottom-right,
GQA / MQA, prefix-LM), forward and backward.

Backends: ``cpp`` (``csrc/varlen/attention_cpu.cpp``: the CPU forward of decode steps, one
query row per sequence), ``triton`` (``sphinx_kernels/triton/varlen_attention.py``), ``torch_flash``
(``sphinx_kernels/ops/torch_flash.py``: torch's bundled FlashAttention-2, GPU), ``flash_attn``
(``sphinx_kernels/ops/flash_attn.py``: flash-attn, GPU, when installed), ``reference``
(:func:`varlen_attention_reference`, differentiated by hand in
:func:`varlen_attention_backward_reference`). The mask is :func:`varlen_attention_mask`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sphinx_kernels._validation import (
    dtype_name,
    host_values,
    mark_values_checked,
    require_bool,
    require_device,
    require_float,
    require_tensor,
    require_unit_stride,
    should_check_values,
    values_checked,
)
from sphinx_kernels.backends import Backend, Impl, OpBackends, Request
from sphinx_kernels.dtypes import FLOAT_DTYPES, KERNEL_DTYPES, accumulate_dtype
from sphinx_kernels.kernel_op import kernel_op
from sphinx_kernels.ops.flash_attn import FLASH_ATTN_BACKEND
from sphinx_kernels.ops.torch_cpu_flash import TORCH_CPU_FLASH_BACKEND
from sphinx_kernels.ops.torch_flash import TORCH_FLASH_BACKEND
from sphinx_kernels.platforms import CPP, REFERENCE, TRITON, native, triton_launcher

__all__ = ["varlen_attention", "varlen_attention_reference", "varlen_attention_backward_reference",
           "varlen_attention_mask", "VarlenAttentionRequest", "VARLEN_ATTENTION_BACKENDS",
           "MAX_ATTENTION_HEAD_DIM"]

MAX_ATTENTION_HEAD_DIM = 256


@dataclass(frozen=True)
class VarlenAttentionRequest(Request):
    """What selects a ``varlen_attention`` backend besides device and dtype. The defaults are a
    typical training call (what ``python -m sphinx_kernels.info`` probes)."""

    head_dim: int = 128
    causal: bool = True
    prefix: bool = False        # prefix_lens given
    max_seqlen: bool = True     # max_seqlen_q and max_seqlen_k given as host ints
    deterministic: bool = False
    decode: bool = False        # max_seqlen_q == 1: at most one query row per sequence (a decode
    #                             step against a KV cache)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int | None = None,
                     max_seqlen_k: int | None = None, *, causal: bool = True,
                     softmax_scale: float | None = None, prefix_lens: torch.Tensor | None = None,
                     deterministic: bool = False, backend: str | None = None) -> torch.Tensor:
    """Attention over packed variable-length sequences: each sequence attends only to itself.

    Args:
        q: ``[Tq, Hq, D]`` float16, bfloat16 or float32 (float64: reference backend only).
        k, v: ``[Tk, Hkv, D]``, the dtype and device of ``q``; ``Hq`` a multiple of ``Hkv`` (GQA;
            MQA with ``Hkv = 1``). ``D`` from 1 to 256 (Triton pads the block to a power of 2, at
            least 16). Any strides with unit stride along ``D``: q, k, v may be views of one fused
            ``[T, (Hq + 2 Hkv) D]`` projection, e.g.
            ``qkv.view(T, -1, D).split([Hq, Hkv, Hkv], 1)``.
        cu_seqlens_q: int32 ``[B + 1]``: sequence b owns the query rows from ``cu_seqlens_q[b]`` to
            ``cu_seqlens_q[b + 1]``; ``cu_seqlens_q[0] == 0``, non-decreasing,
            ``cu_seqlens_q[-1] <= Tq``. Zero-length sequences are legal; rows past
            ``cu_seqlens_q[-1]`` are padding.
        cu_seqlens_k: int32 ``[B + 1]`` for the key rows, the same rules against ``Tk``; None: the
            same as ``cu_seqlens_q`` (self-attention, ``Tk == Tq`` required).
        max_seqlen_q, max_seqlen_k: optional upper bounds of the sequence lengths (host ints). They
            only shrink the launch grid; None uses a bound known from shapes (no host sync). A
            bound below a real length is a contract violation (rows are then left out, never read or
            written out of bounds). The FlashAttention-2 peers (torch_flash, flash_attn), which
            need host ints, serve only calls that pass both.
        causal: (a bool) mask keys after each query's position (bottom-right aligned, below).
        softmax_scale: a finite scale of ``q @ k^T`` before the softmax; None: ``D ** -0.5``.
        prefix_lens: optional int32 ``[B]`` (causal only): the first ``prefix_lens[b]`` key
            positions of sequence b are a bidirectional prefix (prefix-LM: an image and its prompt).
            ``0 <= prefix_lens[b] <= Lk_b``.
        deterministic: (a bool) require a bitwise-repeatable backward. The Triton kernels are always
            deterministic (no atomics anywhere); flash_attn runs its deterministic backward; the
            flag excludes torch_flash, whose backward is not.
        backend: force one of ``VARLEN_ATTENTION_BACKENDS.names`` (else chosen per call).

    Returns:
        ``[Tq, Hq, D]`` in ``q``'s dtype, contiguous. Padding rows are 0, and so is every row that
        sees no key.

    Mask: query i of sequence b (``Lq`` queries, ``Lk`` keys, prefix ``P``, 0 without
    ``prefix_lens``) sits at key position ``p = i + Lk - Lq``: queries are aligned to the END of
    their keys, as for new tokens attending to a KV cache (flash-attn's convention). It sees key j
    iff ``p >= 0 and (j <= p or j < P)`` when causal, every key of its sequence otherwise. A row
    with ``p < 0`` (more queries than keys) sees nothing and outputs 0::

        Lq = 2, Lk = 5:      Lq = 5, Lk = 2:      Lq = Lk = 5, P = 3:
          1 1 1 1 0            0 0                  1 1 1 0 0
          1 1 1 1 1            0 0                  1 1 1 0 0
                               0 0                  1 1 1 0 0
                               1 0                  1 1 1 1 0
                               1 1                  1 1 1 1 1

    With ``cu_seqlens_k`` the prefix counts key positions: a cached prompt of ``P`` tokens stays
    bidirectional while the new queries (all at ``p >= P`` in generation) attend causally.

    Autograd: gradients for q, k, v in their dtypes; padding rows of q (past ``cu_seqlens_q[-1]``)
    and k, v rows past ``cu_seqlens_k[-1]`` get exactly 0. Kernels accumulate in float32 and save
    the float32 log-sum-exp for the backward; memory is linear in T (no score matrix).

    Index values (cu_seqlens, prefix_lens, the bounds) are validated on the CPU; on a GPU only with
    ``SPHINX_KERNELS_CHECK_INPUTS=1`` (a host sync).

    Non-finite values: a NaN or inf in a sequence's q, k or v may turn any output row (and
    gradient row) of that sequence NaN, on every backend (a masked-out key has probability 0, and
    0 times a NaN value is NaN, as in PyTorch's attention); it never reaches another sequence, and
    padding rows stay 0.
    """
    same_keys = cu_seqlens_k is None
    cu_k = cu_seqlens_q if same_keys else cu_seqlens_k
    softmax_scale = _check_varlen_attention(q, k, v, cu_seqlens_q, cu_k, same_keys, max_seqlen_q,
                                            max_seqlen_k, causal, softmax_scale, prefix_lens,
                                            deterministic)
    if same_keys and max_seqlen_k is None:
        max_seqlen_k = max_seqlen_q
    head_dim = q.shape[2]
    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    request = VARLEN_ATTENTION_BACKENDS.request(
        q.device, q.dtype, head_dim=head_dim, causal=causal, prefix=prefix_lens is not None,
        max_seqlen=max_seqlen_q is not None and max_seqlen_k is not None,
        deterministic=deterministic, decode=max_seqlen_q == 1)
    chosen = VARLEN_ATTENTION_BACKENDS.select(request, backend)
    bound_q = q.shape[0] if max_seqlen_q is None else min(max_seqlen_q, q.shape[0])
    bound_k = k.shape[0] if max_seqlen_k is None else min(max_seqlen_k, k.shape[0])
    out, _ = _varlen_attention_op(q, k, v, cu_seqlens_q, cu_k, prefix_lens, bound_q, bound_k,
                                  causal, scale, deterministic, chosen.name)
    return out


def varlen_attention_mask(len_q: int, len_k: int, prefix: int, causal: bool,
                          device: torch.device) -> torch.Tensor:
    """bool ``[Lq, Lk]``: the mask of ``varlen_attention``'s docstring for one sequence."""
    if not causal:
        return torch.ones((len_q, len_k), dtype=torch.bool, device=device)
    pos = torch.arange(len_q, device=device)[:, None] + (len_k - len_q)
    keys = torch.arange(len_k, device=device)[None, :]
    return (pos >= 0) & ((keys <= pos) | (keys < prefix))


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor | None = None,
                               *, causal: bool = True, softmax_scale: float | None = None,
                               prefix_lens: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch ``varlen_attention``: per sequence, ``scaled_dot_product_attention`` in the
    inputs' dtype with an explicit boolean mask; differentiable by autograd; the tests' oracle in
    float64.

    Returns ``(out [Tq, Hq, D], lse [Hq, Tq])``, lse in float32 (float64 for float64 inputs), -inf
    for rows that see no key and for padding rows. Reads the offsets on the host (a sync on a GPU).
    """
    cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    total_q, heads, head_dim = q.shape
    group = heads // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    lse_dtype = accumulate_dtype(q.dtype)
    offsets_q, offsets_k = cu_seqlens_q.tolist(), cu_k.tolist()
    prefixes = prefix_lens.tolist() if prefix_lens is not None else [0] * (len(offsets_q) - 1)
    outs, lses = [], []
    for b, prefix in enumerate(prefixes):
        q0, q1, k0, k1 = offsets_q[b], offsets_q[b + 1], offsets_k[b], offsets_k[b + 1]
        qb = q[q0:q1].transpose(0, 1)                                       # [Hq, Lq, D]
        kb = k[k0:k1].transpose(0, 1).repeat_interleave(group, dim=0)       # [Hq, Lk, D]
        vb = v[k0:k1].transpose(0, 1).repeat_interleave(group, dim=0)
        mask = varlen_attention_mask(q1 - q0, k1 - k0, prefix, causal, q.device)
        sees = mask.any(dim=1)
        # A row that sees nothing attends to everything (finite, so no NaN reaches autograd) and is
        # then replaced by 0; torch.where passes it no gradient.
        ob = torch.nn.functional.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=mask | ~sees[:, None], scale=scale) if k1 > k0 else qb * 0
        outs.append(torch.where(sees[None, :, None], ob, 0).transpose(0, 1))
        scores = (qb.detach().to(lse_dtype) @ kb.detach().to(lse_dtype).transpose(1, 2)) * scale
        lses.append(torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=2)
                    if k1 > k0 else scores.new_full((heads, q1 - q0), float("-inf")))
    padding = total_q - offsets_q[-1]
    out = torch.cat(outs + [q.new_zeros((padding, heads, v.shape[2]))])
    lse = torch.cat(lses + [q.new_full((heads, padding), float("-inf"), dtype=lse_dtype)], dim=1)
    return out, lse


def varlen_attention_backward_reference(grad, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                        prefix_lens, max_seqlen_q, max_seqlen_k, causal,
                                        softmax_scale, deterministic=False):
    """``(dq, dk, dv)`` of the attention written out per sequence, with the backends' backward
    arguments (a custom op's impl runs below autograd, so it cannot differentiate the forward;
    ``out``, ``lse``, the bounds and ``deterministic`` are not needed here): P = softmax(S), dV =
    P^T dO, dS = P * (dO V^T - rowsum(dO V^T * P)), dQ = scale dS K, dK = scale dS^T Q. In float32
    for float16 and bfloat16 inputs: these formulas in half precision lose more than PyTorch's own
    SDPA backward does."""
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        grad, q, k, v = (t.float() for t in (grad, q, k, v))
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    kv_heads, group, head_dim = k.shape[1], q.shape[1] // k.shape[1], q.shape[2]
    offsets_q, offsets_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    prefixes = prefix_lens.tolist() if prefix_lens is not None else [0] * (len(offsets_q) - 1)
    for b, prefix_len in enumerate(prefixes):
        q0, q1, k0, k1 = offsets_q[b], offsets_q[b + 1], offsets_k[b], offsets_k[b + 1]
        qb, gb = q[q0:q1].transpose(0, 1), grad[q0:q1].transpose(0, 1)     # [Hq, Lq, D]
        kb = k[k0:k1].transpose(0, 1).repeat_interleave(group, dim=0)       # [Hq, Lk, D]
        vb = v[k0:k1].transpose(0, 1).repeat_interleave(group, dim=0)
        mask = varlen_attention_mask(q1 - q0, k1 - k0, prefix_len, causal, q.device)
        scores = (qb @ kb.transpose(1, 2) * softmax_scale).masked_fill(~mask, float("-inf"))
        probs = torch.where(mask, torch.softmax(scores, dim=-1), 0)  # a row with no key: 0, not NaN
        grad_probs = gb @ vb.transpose(1, 2)
        grad_scores = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))
        dq[q0:q1] = (grad_scores @ kb * softmax_scale).transpose(0, 1)
        per_head_dk = grad_scores.transpose(1, 2) @ qb * softmax_scale
        per_head_dv = probs.transpose(1, 2) @ gb
        dk[k0:k1] = per_head_dk.view(kv_heads, group, k1 - k0, head_dim).sum(1).transpose(0, 1)
        dv[k0:k1] = per_head_dv.view(kv_heads, group, k1 - k0, head_dim).sum(1).transpose(0, 1)
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


def _reference_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, prefix_lens, max_seqlen_q,
                       max_seqlen_k, causal, softmax_scale, deterministic):
    with torch.no_grad():
        out, lse = varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal,
                                              softmax_scale=softmax_scale, prefix_lens=prefix_lens)
    return out, lse.float()


def _cpp_reasons(request: VarlenAttentionRequest) -> list[str]:
    if not request.decode:
        return ["serves decode steps only (max_seqlen_q = 1): longer query blocks are GEMM-shaped "
                "work, which torch_cpu_flash does faster"]
    return []


def _triton_reasons(request: VarlenAttentionRequest) -> list[str]:
    if request.head_dim > MAX_ATTENTION_HEAD_DIM:
        return [f"head dim {request.head_dim} must be at most {MAX_ATTENTION_HEAD_DIM}"]
    return []


# Impl: forward(q, k, v, cu_seqlens_q, cu_seqlens_k, prefix_lens, max_seqlen_q, max_seqlen_k,
# causal, softmax_scale, deterministic) -> (out, float32 lse [Hq, Tq]); backward(grad, q, k, v, out,
# lse, <the forward's arguments from cu_seqlens_q on>) -> (dq, dk, dv).
VARLEN_ATTENTION_BACKENDS = OpBackends("varlen_attention", [
    # The C++ kernel reads each sequence's keys in place (no gather, padding or mask), backward by
    # torch's CPU flash kernel from its out and lse.
    Backend(CPP, Impl(native("varlen_attention_native"),
                      TORCH_CPU_FLASH_BACKEND.impl.backward), KERNEL_DTYPES,
            _cpp_reasons),
    Backend(TRITON, Impl(triton_launcher("varlen_attention", "varlen_attention_forward"),
                         triton_launcher("varlen_attention", "varlen_attention_backward")),
            KERNEL_DTYPES, _triton_reasons),
    TORCH_FLASH_BACKEND,
    FLASH_ATTN_BACKEND,
    TORCH_CPU_FLASH_BACKEND,
    Backend(REFERENCE, Impl(_reference_forward, varlen_attention_backward_reference), FLOAT_DTYPES),
], request_type=VarlenAttentionRequest)


@kernel_op("sphinx_kernels::varlen_attention")
def _varlen_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                         prefix_lens: torch.Tensor | None,
                         max_seqlen_q: int, max_seqlen_k: int, causal: bool, softmax_scale: float,
                         deterministic: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = VARLEN_ATTENTION_BACKENDS[backend].impl.forward(
        q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        prefix_lens=prefix_lens, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        causal=causal, softmax_scale=softmax_scale, deterministic=deterministic)
    return out.contiguous(), lse.contiguous()


@_varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, prefix_lens, max_seqlen_q, max_seqlen_k, causal,
      softmax_scale, deterministic, backend):
    total_q, heads, _ = q.shape
    return (q.new_empty((total_q, heads, v.shape[2])),
            q.new_empty((heads, total_q), dtype=torch.float32))


@kernel_op("sphinx_kernels::varlen_attention_backward")
def _varlen_attention_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                  v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                  cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                                  prefix_lens: torch.Tensor | None, max_seqlen_q: int,
                                  max_seqlen_k: int, causal: bool, softmax_scale: float,
                                  deterministic: bool, backend: str
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = VARLEN_ATTENTION_BACKENDS[backend].impl.backward(
        grad=grad, q=q, k=k, v=v, out=out, lse=lse, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, prefix_lens=prefix_lens, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, causal=causal, softmax_scale=softmax_scale,
        deterministic=deterministic)
    return tuple(g.contiguous() for g in grads)


@_varlen_attention_backward_op.register_fake
def _(grad, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, prefix_lens, max_seqlen_q, max_seqlen_k,
      causal, softmax_scale, deterministic, backend):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, prefix, max_q, max_k, causal, scale, deterministic, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    # lse gets None in the backward, not a zero-filled gradient.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, prefix)
    ctx.arguments = (max_q, max_k, causal, scale, deterministic, backend)


def _backward(ctx, grad, _grad_lse):
    q, k, v, out, lse, cu_q, cu_k, prefix = ctx.saved_tensors
    dq, dk, dv = _varlen_attention_backward_op(grad, q, k, v, out, lse, cu_q, cu_k, prefix,
                                               *ctx.arguments)
    return (dq, dk, dv) + (None,) * 9


_varlen_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _check_varlen_attention(q, k, v, cu_q, cu_k, same_keys, max_seqlen_q, max_seqlen_k, causal,
                            softmax_scale, prefix_lens, deterministic) -> float | None:
    """Validates the call before any launch; returns ``softmax_scale`` as a float (or None)."""
    require_tensor("q", q, dims=3, dtypes=FLOAT_DTYPES)
    for name, t in (("k", k), ("v", v)):
        require_tensor(name, t, dims=3)
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {dtype_name(t.dtype)} but q has "
                            f"{dtype_name(q.dtype)}; q, k and v must share one dtype")
        require_device(name, t, q.device, "q")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    total_q, heads, head_dim = q.shape
    total_k, kv_heads, k_dim = k.shape
    if k_dim != head_dim:
        raise ValueError(f"k and v must have q's head dim {head_dim}, got {k_dim}")
    if not 1 <= head_dim <= MAX_ATTENTION_HEAD_DIM:
        raise ValueError(f"head dim (q.shape[2]) must be 1 to {MAX_ATTENTION_HEAD_DIM}, got "
                         f"{head_dim}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q's heads ({heads}) must be a positive multiple of k's and v's heads "
                         f"({kv_heads})")
    if same_keys and total_k != total_q:
        raise ValueError(f"without cu_seqlens_k, k and v must have q's {total_q} rows, got "
                         f"{total_k}; pass cu_seqlens_k for keys laid out differently")
    for name, t in (("q", q), ("k", k), ("v", v)):
        require_unit_stride(name, t)
    names = ("cu_seqlens_q",) if same_keys else ("cu_seqlens_q", "cu_seqlens_k")
    for name, cu in zip(names, (cu_q, cu_k)):
        require_tensor(name, cu, dims=1, dtypes=(torch.int32,))
        require_device(name, cu, q.device, "q")
        if cu.shape[0] == 0:
            raise ValueError(f"{name} must have B + 1 >= 1 entries, got none")
    if cu_k.shape != cu_q.shape:
        raise ValueError(f"cu_seqlens_k has {cu_k.shape[0]} entries but cu_seqlens_q has "
                         f"{cu_q.shape[0]}; both must be [B + 1]")
    num_seqs = cu_q.shape[0] - 1
    require_bool("causal", causal)
    require_bool("deterministic", deterministic)
    if prefix_lens is not None:
        if not causal:
            raise ValueError("prefix_lens applies to causal attention only; pass causal=True or "
                             "drop prefix_lens (non-causal attention already sees every key)")
        require_tensor("prefix_lens", prefix_lens, dims=1, dtypes=(torch.int32,))
        require_device("prefix_lens", prefix_lens, q.device, "q")
        if prefix_lens.shape[0] != num_seqs:
            raise ValueError(f"prefix_lens must be [B] = [{num_seqs}], got "
                             f"{tuple(prefix_lens.shape)}")
    for name, bound in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int)
                                  or bound < 0):
            raise TypeError(f"{name} must be None or an int >= 0, got {bound!r}")
    softmax_scale = require_float("softmax_scale", softmax_scale, optional=True)
    extra = () if prefix_lens is None else (prefix_lens,)
    check = ("varlen_attention", total_q, total_k, max_seqlen_q, max_seqlen_k)
    if should_check_values(cu_q, cu_k, *extra) and not values_checked(check, cu_q, cu_k, *extra):
        lengths = {}
        for name, cu, total in (("cu_seqlens_q", cu_q, total_q), ("cu_seqlens_k", cu_k, total_k)):
            offsets = host_values(cu)
            if offsets[0] != 0:
                raise ValueError(f"{name}[0] must be 0, got {int(offsets[0])}")
            steps = offsets[1:] - offsets[:-1]
            if (steps < 0).any():
                b = int(np.argmax(steps < 0))
                raise ValueError(f"{name} must be non-decreasing; {name}[{b + 1}] = "
                                 f"{int(offsets[b + 1])} < {name}[{b}] = {int(offsets[b])}")
            if offsets[-1] > total:
                raise ValueError(f"{name}[-1] = {int(offsets[-1])} exceeds the {total} rows of "
                                 f"{'q' if name == 'cu_seqlens_q' else 'k and v'}")
            lengths[name] = steps
        for name, key, bound in (("max_seqlen_q", "cu_seqlens_q", max_seqlen_q),
                                 ("max_seqlen_k", "cu_seqlens_k", max_seqlen_k)):
            longest = int(lengths[key].max()) if num_seqs else 0
            if bound is not None and bound < longest:
                raise ValueError(f"{name} = {bound} is below the longest sequence ({longest}); it "
                                 "must be an upper bound")
        if prefix_lens is not None:
            prefixes, key_lengths = host_values(prefix_lens), lengths["cu_seqlens_k"]
            bad = (prefixes < 0) | (prefixes > key_lengths)
            if bad.any():
                b = int(np.argmax(bad))
                raise ValueError(f"prefix_lens[{b}] = {int(prefixes[b])} must be in [0, "
                                 f"{int(key_lengths[b])}] (the key length of sequence {b})")
        mark_values_checked(check, cu_q, cu_k, *extra)
    return softmax_scale
