"""The ``torch_cpu_flash`` backend of ``varlen_attention``: torch's own CPU flash attention
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, what
``scaled_dot_product_attention`` runs on the CPU), called per sequence, or per batch of sequences
that have a single query row.

On the CPU the sequence offsets are host memory, so reading them costs no device sync; each call
attends one sequence's rows ``[1, Hq, L, D]`` (keys and values repeated to the query heads, and
the key gradients summed back over each group). Sequences with a single query row (a decode step
against a KV cache) go in batches instead: their keys gathered into ``[m, Hkv, L_max, D]`` (the
shorter ones masked), one call for many sequences, as a call per sequence would cost more in
per-call overhead than the attention itself at decode sizes.

Plain causal self-attention (``Lq == Lk``, no prefix) and non-causal attention use the kernel's
own masking; the bottom-right causal mask of a KV cache and the prefix-LM mask go in as an additive
mask. A query row that sees no key (bottom-right causal with ``Lq > Lk``) gets 0 and a -inf
log-sum-exp, as the reference does, and passes no gradient.

Its log-sum-exp (float32 ``[Hq, Tq]``) is the kernel's own, in natural log, the reference's layout.
The backward is a loop over (sequence, head) tasks with no atomics: deterministic.
"""
from __future__ import annotations

import numpy as np
import torch

from sphinx_kernels.backends import Backend, Impl, Platform
from sphinx_kernels.dtypes import KERNEL_DTYPES

__all__ = ["TORCH_CPU_FLASH", "TORCH_CPU_FLASH_BACKEND"]


def _sequences(cu_seqlens_q, cu_seqlens_k, prefix_lens):
    """``(q0, q1, k0, k1, prefix)`` of every sequence with query rows, from host offsets."""
    offsets_q, offsets_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    prefixes = prefix_lens.tolist() if prefix_lens is not None else [0] * (len(offsets_q) - 1)
    for b, prefix in enumerate(prefixes):
        if offsets_q[b + 1] > offsets_q[b]:
            yield offsets_q[b], offsets_q[b + 1], offsets_k[b], offsets_k[b + 1], prefix


def _mask(len_q, len_k, prefix, causal, dtype, device):
    """``(is_causal, additive mask or None, rows that see a key or None)`` for one sequence: the
    kernel's own causal mask where it is ours (top-left and bottom-right agree when ``Lq == Lk``),
    else ``varlen_attention_mask`` as 0 / -inf, keyless rows opened to every key (finite values,
    replaced afterwards)."""
    if not causal or len_q == 1:  # one query row is the last: bottom-right, it sees every key
        return False, None, None
    if prefix == 0 and len_q == len_k:
        return True, None, None
    # Imported here: the op's module lists this backend, so it imports this module first.
    from sphinx_kernels.ops.varlen_attention import varlen_attention_mask

    allowed = varlen_attention_mask(len_q, len_k, prefix, causal, device)
    sees = allowed.any(dim=1)
    allowed |= ~sees[:, None]
    additive = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return False, additive.masked_fill_(~allowed, float("-inf")), None if sees.all() else sees


def _heads_first(x, start, end, group):
    """Rows ``start:end`` of a ``[T, H, D]`` tensor as ``[1, H * group, L, D]``."""
    rows = x[start:end].transpose(0, 1)
    return (rows.repeat_interleave(group, dim=0) if group > 1 else rows)[None]


def _unmasked(q, k, v, q0, q1, k0, k1, softmax_scale):
    """Attention of query rows ``q0:q1`` to every key ``k0:k1``: with no mask the rows are
    independent, so each kv head's query heads go in as more rows of that head (``[1, Hkv,
    Lq * group, D]``) instead of the keys and values repeated to every query head. Returns
    ``out [Lq, Hq, Dv]`` and ``lse [Hq, Lq]``."""
    len_q, kv_heads = q1 - q0, k.shape[1]
    group = q.shape[1] // kv_heads
    rows = q[q0:q1].view(len_q, kv_heads, group, -1).transpose(0, 1).reshape(
        1, kv_heads, len_q * group, -1)
    seq_out, seq_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        rows, _heads_first(k, k0, k1, 1), _heads_first(v, k0, k1, 1), 0.0, False,
        scale=softmax_scale)
    out = seq_out[0].view(kv_heads, len_q, group, -1).transpose(0, 1).reshape(len_q, q.shape[1], -1)
    return out, seq_lse[0].view(kv_heads, len_q, group).transpose(1, 2).reshape(q.shape[1], len_q)


def _single_row_batches(sequences, kv_heads, head_dim):
    """Sequences of one query row each, grouped for batched calls: a batch's padded key rows stay
    within twice its real ones plus about a million padding elements (longest keys first, so that a
    few long sequences among short ones do not make every short one pay for them)."""
    slack = max(1, (1 << 20) // (kv_heads * head_dim))
    lengths = [k1 - k0 for _, _, k0, k1, _ in sequences]
    if len(sequences) * max(lengths, default=0) <= 2 * sum(lengths) + slack:
        if sequences:
            yield sequences
        return
    batch, longest, real = [], 0, 0
    for seq in sorted(sequences, key=lambda s: s[3] - s[2], reverse=True):
        length = seq[3] - seq[2]
        if batch and (len(batch) + 1) * longest > 2 * (real + length) + slack:
            yield batch
            batch, real = [], 0
        if not batch:
            longest = length
        batch.append(seq)
        real += length
    yield batch


def _single_rows(q, k, v, sequences, softmax_scale, every_row):
    """Attention of sequences with one query row each (it sees every key of its sequence: a last
    row under the bottom-right causal mask, any prefix included), in one call: keys and values
    gathered to ``[m, Hkv, L, D]``, the shorter sequences' missing keys masked, the query heads of
    each kv head as its rows (``[m, Hkv, group, D]``). The indices are built with NumPy on the host
    (each small torch op would cost more). ``every_row``: the sequences' rows are all of q's rows,
    in order (a decode step), so q is read and the results returned without index copies.

    Returns ``(query rows [m] int64, out [m, Hq, Dv], lse [Hq, m])``."""
    kv_heads, head_dim = k.shape[1], k.shape[2]
    group = q.shape[1] // kv_heads
    bounds = np.array(sequences, dtype=np.int64)        # [m, 5]: q0, q1, k0, k1, prefix
    starts, lengths = bounds[:, 2], bounds[:, 3] - bounds[:, 2]
    count, longest = len(sequences), int(lengths.max())
    positions = np.arange(longest)
    # Key rows past a sequence's end are clamped into the tensor and masked out below.
    index = torch.from_numpy(np.minimum(starts[:, None] + positions, k.shape[0] - 1).ravel())
    keys, values = (t.index_select(0, index).view(count, longest, kv_heads, head_dim)
                    .transpose(1, 2) for t in (k, v))
    mask = None
    if lengths.min() < longest:
        additive = np.where(positions >= lengths[:, None], -np.inf, 0.0).astype(np.float32)
        mask = torch.from_numpy(additive).to(q.dtype).view(count, 1, 1, longest)
    rows = torch.from_numpy(bounds[:, 0])
    queries = q if every_row else q.index_select(0, rows)
    batch_out, batch_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        queries.reshape(count, kv_heads, group, head_dim), keys, values, 0.0, False,
        attn_mask=mask, scale=softmax_scale)
    return rows, batch_out.reshape(count, kv_heads * group, -1), \
        batch_lse.reshape(count, kv_heads * group).t()


def _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, prefix_lens, max_seqlen_q, max_seqlen_k, causal,
             softmax_scale, deterministic):
    heads, group = q.shape[1], q.shape[1] // k.shape[1]
    single, several = [], []
    for seq in _sequences(cu_seqlens_q, cu_seqlens_k, prefix_lens):
        if seq[3] > seq[2]:  # no key: the rows stay 0 with a -inf log-sum-exp
            (single if seq[1] - seq[0] == 1 else several).append(seq)
    batches = list(_single_row_batches(single, k.shape[1], k.shape[2]))
    # Distinct rows in increasing order: as many as q has means exactly 0 .. Tq - 1.
    if not several and len(batches) == 1 and len(single) == q.shape[0]:
        _, out, lse = _single_rows(q, k, v, single, softmax_scale, every_row=True)
        return out, lse
    out = q.new_zeros((q.shape[0], heads, v.shape[2]))
    lse = torch.full((heads, q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    for batch in batches:
        rows, batch_out, batch_lse = _single_rows(q, k, v, batch, softmax_scale, every_row=False)
        out.index_copy_(0, rows, batch_out)
        lse.index_copy_(1, rows, batch_lse)
    for q0, q1, k0, k1, prefix in several:
        is_causal, mask, sees = _mask(q1 - q0, k1 - k0, prefix, causal, q.dtype, q.device)
        if not is_causal and mask is None:
            out[q0:q1], lse[:, q0:q1] = _unmasked(q, k, v, q0, q1, k0, k1, softmax_scale)
            continue
        seq_out, seq_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _heads_first(q, q0, q1, 1), _heads_first(k, k0, k1, group),
            _heads_first(v, k0, k1, group), 0.0, is_causal, attn_mask=mask, scale=softmax_scale)
        seq_out, seq_lse = seq_out[0], seq_lse[0]
        if sees is not None:
            seq_out = torch.where(sees[None, :, None], seq_out, 0)
            seq_lse = seq_lse.masked_fill(~sees[None, :], float("-inf"))
        out[q0:q1] = seq_out.transpose(0, 1)
        lse[:, q0:q1] = seq_lse
    return out, lse


def _backward(grad, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, prefix_lens, max_seqlen_q,
              max_seqlen_k, causal, softmax_scale, deterministic):
    kv_heads, group = k.shape[1], q.shape[1] // k.shape[1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for q0, q1, k0, k1, prefix in _sequences(cu_seqlens_q, cu_seqlens_k, prefix_lens):
        if k1 == k0:
            continue
        is_causal, mask, sees = _mask(q1 - q0, k1 - k0, prefix, causal, q.dtype, q.device)
        seq_grad, seq_out = _heads_first(grad, q0, q1, 1), _heads_first(out, q0, q1, 1)
        seq_lse = lse[None, :, q0:q1]
        if sees is not None:
            # Keyless rows attended to every key in the forward and were replaced by 0: no gradient
            # flows through them, and a finite stand-in log-sum-exp keeps the kernel's exp finite.
            seq_grad = torch.where(sees[None, None, :, None], seq_grad, 0)
            seq_lse = seq_lse.masked_fill(~sees[None, None, :], 0.0)
        flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        grad_q, grad_k, grad_v = flash_backward(
            seq_grad.contiguous(), _heads_first(q, q0, q1, 1), _heads_first(k, k0, k1, group),
            _heads_first(v, k0, k1, group), seq_out, seq_lse.contiguous(), 0.0, is_causal,
            attn_mask=mask, scale=softmax_scale)
        length = k1 - k0
        dq[q0:q1] = grad_q[0].transpose(0, 1)
        dk[k0:k1] = grad_k[0].view(kv_heads, group, length, -1).sum(1).transpose(0, 1)
        dv[k0:k1] = grad_v[0].view(kv_heads, group, length, -1).sum(1).transpose(0, 1)
    return dq, dk, dv


def _missing(device: torch.device) -> str | None:
    if not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return "this torch build has no CPU flash attention"
    return None


TORCH_CPU_FLASH = Platform("torch_cpu_flash", frozenset({"cpu"}), None, _missing)
TORCH_CPU_FLASH_BACKEND = Backend(TORCH_CPU_FLASH, Impl(_forward, _backward), KERNEL_DTYPES)
