"""``pack_by_token_budget``: first-fit-decreasing packing of sample lengths into bins of at most
``budget`` tokens, in O(n log n), with the padding it saves over fixed-size batches.

Backends: ``cpp`` (``csrc/varlen/layout_cpu.cpp``), ``reference``
(:func:`pack_by_token_budget_reference`, the same tree search in Python lists). CPU data
preparation: no autograd.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Sequence

import torch

from sphinx_kernels._validation import INDEX_DTYPES, INT32_MAX, require_int, require_tensor
from sphinx_kernels.backends import Backend, Impl, OpBackends
from sphinx_kernels.kernel_op import kernel_op
from sphinx_kernels.platforms import CPP, CPU_REFERENCE, native

__all__ = ["Packing", "pack_by_token_budget", "pack_by_token_budget_reference",
           "PACK_BY_TOKEN_BUDGET_BACKENDS"]


class Packing(NamedTuple):
    """Samples packed into bins of at most ``budget`` tokens by ``pack_by_token_budget``.

    Padding counts compare two ways of batching the same ``n`` samples:
    ``padding_tokens = num_bins * budget - sum(lengths)``, the padding when every bin is padded to
    the budget (``plan_layout(..., length=budget)``); ``baseline_padding_tokens``, the padding when
    the samples, in their given order, are cut into fixed-size batches of ``baseline_batch_size``
    consecutive samples (the last one shorter) and every sample is padded to the longest of its
    batch. ``saved_padding_tokens`` is the difference (negative if packing pads more).
    """

    bin_ids: torch.Tensor      # [n] int64: the bin of each sample
    order: torch.Tensor        # [n] int64: samples grouped by bin, each bin in placement order
    bin_offsets: torch.Tensor  # [num_bins + 1] int64: bin b: order[bin_offsets[b]:bin_offsets[b+1]]
    bin_tokens: torch.Tensor   # [num_bins] int64: tokens in each bin, <= budget
    padding_tokens: int
    baseline_padding_tokens: int
    baseline_batch_size: int

    @property
    def num_bins(self) -> int:
        return self.bin_tokens.shape[0]

    @property
    def saved_padding_tokens(self) -> int:
        return self.baseline_padding_tokens - self.padding_tokens


def pack_by_token_budget(lengths: torch.Tensor | Sequence[int], budget: int, *,
                         baseline_batch_size: int | None = None,
                         backend: str | None = None) -> Packing:
    """First-fit-decreasing packing of samples into bins of at most ``budget`` tokens.

    Samples are placed longest first (equal lengths: lower sample index first), each into the
    lowest-numbered bin it fits in, a new bin opening when none does. A tree over the bins' free
    space finds that bin in O(log n): O(n log n) in all.

    Args:
        lengths: ``[n]`` int32 / int64 CPU tensor (or a sequence of ints; a float, even a whole
            one, raises TypeError) of sample lengths, each in ``[0, budget]``. A sample longer than
            the budget raises ValueError: truncate or drop it first (a bin of its own would break
            the budget the caller sized memory for).
        budget: tokens per bin, from 1 to 2^31 - 1 (a bin is one packed batch, whose rows int32
            ``cu_seqlens`` address).
        baseline_batch_size: samples per batch of the fixed-size baseline that the padding is
            compared with (see :class:`Packing`); default ``ceil(n / num_bins)``, the packing's own
            mean samples per bin; one larger than ``n`` is one batch of every sample.
        backend: force one of ``PACK_BY_TOKEN_BUDGET_BACKENDS.names``.

    Returns:
        :class:`Packing` of CPU int64 tensors (no bins for ``n == 0``). Deterministic. Data
        preparation: no autograd, not for ``torch.compile`` (the number of bins comes from the
        values).
    """
    # Lengths <= budget < 2^31: no int64 sum over fewer than 2^32 of them wraps.
    require_int("budget", budget, minimum=1, maximum=INT32_MAX)
    if baseline_batch_size is not None:
        require_int("baseline_batch_size", baseline_batch_size, minimum=1)
    if not isinstance(lengths, torch.Tensor):
        lengths = _lengths_tensor(lengths, budget)
    require_tensor("lengths", lengths, dims=1, dtypes=INDEX_DTYPES)
    if lengths.device.type != "cpu":
        raise ValueError(f"lengths must be on the CPU, got {lengths.device}")
    lengths = lengths.to(torch.int64).contiguous()
    if lengths.numel():
        low, high = (int(v) for v in torch.aminmax(lengths))
        _require_in_budget(low, high, int(torch.argmax(lengths)), budget)
    request = PACK_BY_TOKEN_BUDGET_BACKENDS.request("cpu", torch.int64)
    chosen = PACK_BY_TOKEN_BUDGET_BACKENDS.select(request, backend)
    bin_ids, order, bin_offsets, bin_tokens = _pack_by_token_budget_op(lengths, budget, chosen.name)
    num, num_bins = lengths.shape[0], bin_tokens.shape[0]
    batch = baseline_batch_size or max(-(-num // max(num_bins, 1)), 1)
    return Packing(bin_ids, order, bin_offsets, bin_tokens,
                   num_bins * budget - int(lengths.sum()),
                   _fixed_batch_padding(lengths, batch), batch)


def _require_in_budget(low: int, high: int, at_high: int, budget: int) -> None:
    """The lengths' range (``high`` at index ``at_high``) must lie in ``[0, budget]``."""
    if low < 0:
        raise ValueError(f"lengths must be >= 0, got {low}")
    if high > budget:
        raise ValueError(f"lengths[{at_high}] = {high} exceeds budget = {budget}; truncate or drop "
                         "such samples before packing")


def _lengths_tensor(values, budget: int) -> torch.Tensor:
    """A sequence of int lengths as an int64 tensor, its types and range checked first (an int
    beyond int64 does not fit a tensor)."""
    try:
        values = list(values)
    except TypeError as error:
        raise TypeError(f"lengths must be a tensor or a sequence of ints, got "
                        f"{type(values).__name__}") from error
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"lengths[{i}] must be an int, got {type(value).__name__}")
    if values:
        high = max(values)
        _require_in_budget(min(values), high, values.index(high), budget)
    return torch.tensor(values, dtype=torch.int64)


def _fixed_batch_padding(lengths: torch.Tensor, batch_size: int) -> int:
    """Padding of consecutive batches of ``batch_size`` samples, each padded to its longest."""
    num = lengths.shape[0]
    if num == 0:
        return 0
    batch_size = min(batch_size, num)  # a batch beyond the samples holds them all
    full = -(-num // batch_size) * batch_size
    # Padding samples of length 0 fill the last batch; they count as neither tokens nor padding.
    grid = torch.nn.functional.pad(lengths, (0, full - num)).view(-1, batch_size)
    sizes = torch.full((grid.shape[0],), batch_size, dtype=torch.int64)
    sizes[-1] = num - (grid.shape[0] - 1) * batch_size
    return int((grid.max(1).values * sizes).sum() - lengths.sum())


def pack_by_token_budget_reference(lengths: torch.Tensor, budget: int) -> tuple[torch.Tensor, ...]:
    """Pure-Python first-fit decreasing on validated int64 lengths (the same tree search as the C++
    kernel, in Python lists): ``(bin_ids, order, bin_offsets, bin_tokens)``."""
    values = lengths.tolist()
    num = len(values)
    placement = sorted(range(num), key=lambda i: (-values[i], i))
    size = 1
    while size < max(num, 1):
        size *= 2
    # free[size + b]: free tokens of bin b (every one of the n possible bins starts empty);
    # free[node]: the most free tokens of any bin under node. The first bin that fits is found by
    # descending to the left child whenever it has room.
    free = [0] * size + [budget] * num + [-1] * (size - num)
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    bin_ids = [0] * num
    num_bins = 0
    for sample in placement:
        need = values[sample]
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        bin_ids[sample] = node - size
        num_bins = max(num_bins, node - size + 1)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    bins = torch.tensor(bin_ids, dtype=torch.int64)
    placed = torch.tensor(placement, dtype=torch.int64)
    # Group by bin, keeping placement order within each bin.
    order = placed[torch.sort(bins[placed], stable=True).indices]
    counts = torch.bincount(bins, minlength=num_bins) if num else torch.zeros(0, dtype=torch.int64)
    bin_offsets = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0))
    bin_tokens = torch.zeros(num_bins, dtype=torch.int64).index_add_(0, bins, lengths)
    return bins, order, bin_offsets, bin_tokens


# Impl: forward(lengths, budget) on validated int64 lengths -> (bin_ids, order, bin_offsets,
# bin_tokens).
PACK_BY_TOKEN_BUDGET_BACKENDS = OpBackends("pack_by_token_budget", [
    Backend(CPP, Impl(native("pack_by_token_budget_native")), frozenset({torch.int64})),
    Backend(CPU_REFERENCE, Impl(pack_by_token_budget_reference), frozenset({torch.int64})),
])


@kernel_op("sphinx_kernels::pack_by_token_budget")
def _pack_by_token_budget_op(lengths: torch.Tensor, budget: int, backend: str
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(PACK_BY_TOKEN_BUDGET_BACKENDS[backend].impl.forward(lengths=lengths,
                                                                     budget=budget))


@_pack_by_token_budget_op.register_fake
def _(lengths, budget, backend):
    num_bins = torch.library.get_ctx().new_dynamic_size()
    def new(*shape):
        return lengths.new_empty(shape, dtype=torch.int64)
    return new(lengths.shape[0]), new(lengths.shape[0]), new(num_bins + 1), new(num_bins)
