"""Cross-entropy of an LM head without the full logits: ``sum_t CE(hidden[t] @ weight.T, labels[t])``
over the labelled rows, a chunk of rows at a time.

The float32 ``[T, V]`` logits of a packed batch are the largest tensor of LLM training (16k rows of
InternLM2's 92544-word vocabulary: 6 GB), and most rows of a multimodal batch (image rows, prompts)
have no label. So only labelled rows are projected, in chunks of ``chunk_rows``, and each chunk's
gradients (w.r.t. the hidden rows and the head's weight) are computed while its logits are alive
(Liger-Kernel's fused-linear-cross-entropy habit): the backward only scales them. Peak extra memory is
one chunk's logits (float32, plus the matmul's output in the weight's dtype), the hidden rows'
gradient and one weight-sized gradient (float32 for low-precision weights, rounded once).

``linear_cross_entropy_reference`` is the plain computation, for tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sphinx_kernels import IGNORE_INDEX
from sphinx_kernels._validation import require_tensor

__all__ = ["LOSS_CHUNK_BYTES", "default_chunk_rows", "linear_cross_entropy",
           "linear_cross_entropy_reference"]

LOSS_CHUNK_BYTES = 256 << 20  # float32 logits per chunk by default


def default_chunk_rows(vocab_size: int) -> int:
    """Rows whose float32 logits fill ``LOSS_CHUNK_BYTES`` (2048 rows at 32000 words, 725 at
    92544)."""
    return max(1, LOSS_CHUNK_BYTES // (4 * vocab_size))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy of the rows with a label, never holding the full logits.

    Args:
        hidden: ``[T, H]`` float16, bfloat16 or float32 hidden states.
        weight: ``[V, H]`` LM head weight, ``hidden``'s dtype and device.
        labels: int64 ``[T]``: the class of each row in ``[0, V)``, or ``IGNORE_INDEX`` (-100).
        chunk_rows: labelled rows per chunk; None: :func:`default_chunk_rows`.

    Returns:
        float32 scalar ``sum_t (logsumexp(z_t) - z_t[labels[t]])`` over labelled rows, with
        ``z_t = (hidden[t] @ weight.T)`` computed in the inputs' dtype and upcast to float32 (as
        ``F.cross_entropy(logits.float(), ...)`` over a low-precision LM head). 0 without labelled
        rows. Differentiable w.r.t. ``hidden`` and ``weight``.

    Selecting the labelled rows reads their count back (one host sync), and so does the label range
    check.
    """
    require_tensor("hidden", hidden, dims=2, dtypes=(torch.float16, torch.bfloat16, torch.float32))
    require_tensor("weight", weight, dims=2, dtypes=(hidden.dtype,))
    require_tensor("labels", labels, dims=1, dtypes=(torch.int64,))
    if weight.shape[1] != hidden.shape[1] or weight.device != hidden.device:
        raise ValueError(f"weight must be [V, H = {hidden.shape[1]}] on {hidden.device}, got "
                         f"{tuple(weight.shape)} on {weight.device}")
    if labels.shape[0] != hidden.shape[0] or labels.device != hidden.device:
        raise ValueError(f"labels must be [T = {hidden.shape[0]}] on {hidden.device}, got "
                         f"{tuple(labels.shape)} on {labels.device}")
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.shape[0])
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    rows = torch.nonzero(labels != IGNORE_INDEX).squeeze(1)
    targets = labels.index_select(0, rows)
    if targets.numel():
        low, high = torch.aminmax(targets)
        if low < 0 or high >= weight.shape[0]:
            raise ValueError(f"labels must be in [0, V = {weight.shape[0]}) or {IGNORE_INDEX}, got "
                             f"values in [{int(low)}, {int(high)}]")
    return _LinearCrossEntropy.apply(hidden.index_select(0, rows), weight, targets, chunk_rows)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor,
                                   labels: torch.Tensor) -> torch.Tensor:
    """The plain computation: full logits, upcast, ``F.cross_entropy(..., reduction="sum")``."""
    logits = (hidden @ weight.T).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward over chunks of (already selected) labelled rows; the gradients of the sum are computed
    in the same pass and the backward scales them by the incoming scalar gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # A low-precision weight's gradient is summed over chunks in float32 and rounded once.
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if need_weight else None)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = hidden[start:start + chunk_rows]
            labels = targets[start:start + chunk_rows, None]
            logits = (rows @ weight.T).float()  # no copy when the inputs are float32
            lse = torch.logsumexp(logits, dim=1, keepdim=True)
            total += (lse - logits.gather(1, labels)).sum()
            if not (need_hidden or need_weight):
                continue
            logits.sub_(lse).exp_()  # softmax, in place
            logits.scatter_add_(1, labels, logits.new_full(labels.shape, -1.0))
            grad, logits = logits.to(weight.dtype), None  # the float32 chunk is freed here
            if need_hidden:
                torch.mm(grad, weight, out=grad_hidden[start:start + chunk_rows])
            if need_weight:
                if grad_weight.dtype == grad.dtype:
                    grad_weight.addmm_(grad.T, rows)
                else:
                    grad_weight += grad.T @ rows
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None
