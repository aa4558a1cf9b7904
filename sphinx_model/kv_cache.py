"""The preallocated key/value cache of generation: one slot of rows per sequence, written in place.

Layout. Per layer, keys and values are ``[capacity, Hkv, D]`` rows (all layers in one
``[L, capacity, Hkv, D]`` allocation each); sequence ``i`` owns the slot of rows
``starts[i] : starts[i] + slot_sizes[i]`` (its prompt plus the most tokens it may generate) and its
cached rows are the first ``lengths[i]`` of them. A forward writes each sequence's new rows right
after its cached ones (``index_copy_``) and attends over the slot's filled part; nothing is ever
re-packed or concatenated, so a decode step allocates no cache memory and its cost does not grow
with what is cached.

Gaps. ``varlen_attention`` takes each sequence's keys as one contiguous range of a packed tensor,
``cu_seqlens_k[b] : cu_seqlens_k[b + 1]``, ranges back to back. The filled parts of the slots are
not back to back (each slot's unfilled tail, and the slots of sequences that left the batch, lie
between them), so every forward describes ``2m`` sequences for ``m`` live ones: before live sequence
``j`` a *gap* sequence covering the rows between the previous live sequence's last row and this
one's slot start, with no query rows (it sees nothing and costs nothing), then the sequence itself::

    cu_seqlens_k = [0, start_0, start_0 + len_0, start_1, start_1 + len_1, ...]      [2m + 1]
    cu_seqlens_q = [0, 0,       new_0,           new_0,   new_0 + new_1,   ...]      [2m + 1]

The model is called with that ``cu_seqlens_q`` (zero-length sequences are legal everywhere), the new
rows of live sequence ``j`` being packed sequence ``2j + 1``.
:meth:`PreallocatedKVCache.begin_forward` builds both for a forward; a decode step (one new row per
live sequence) does it with in-place ops on preallocated buffers.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from sphinx_model.config import LLMConfig

__all__ = ["PreallocatedKVCache", "interleave_gaps"]


def interleave_gaps(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[B + 1]`` boundaries -> ``[2B + 1]``: a zero-length sequence before each one
    (``[0, 0, c_1, c_1, c_2, ...]``), the query layout of a forward with a
    :class:`PreallocatedKVCache` (see the module docstring)."""
    return cu_seqlens.repeat_interleave(2)[:-1]


class PreallocatedKVCache:
    """A :class:`sphinx_model.KVCache` with one preallocated slot per sequence (module docstring).

    Args:
        cfg: the decoder's config (layers, KV heads, head dim).
        slot_sizes: rows each sequence may ever hold (prompt + new tokens), ``B`` ints >= 1.
        dtype, device: of the keys and values (the model's).
        prefix_lens: rows of each sequence's bidirectional prefix (prefix-LM image block), or None;
            :meth:`prefix_lens` gives them in the interleaved layout for the model.

    Use: :meth:`select` the live sequences, :meth:`begin_forward` with their new rows to get the
    model's ``cu_seqlens``, then run the model with ``kv_cache=cache``; repeat. Sequences that
    finished leave with another :meth:`select`; their slots are no longer read.
    """

    def __init__(self, cfg: LLMConfig, slot_sizes: Sequence[int], dtype: torch.dtype,
                 device: torch.device | str, prefix_lens: Sequence[int] | None = None):
        sizes = [int(s) for s in slot_sizes]
        if not sizes or min(sizes) < 1:
            raise ValueError(f"slot_sizes must be a non-empty list of ints >= 1, got {sizes}")
        if prefix_lens is not None and len(prefix_lens) != len(sizes):
            raise ValueError(f"prefix_lens must have one entry per slot ({len(sizes)}), got "
                             f"{len(prefix_lens)}")
        device = torch.device(device)
        batch = len(sizes)
        self.capacity = sum(sizes)
        self.slot_sizes = sizes
        shape = (cfg.num_layers, self.capacity, cfg.num_kv_heads, cfg.dim_per_head)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        index = {"dtype": torch.int64, "device": device}
        starts = [0] * batch
        for i in range(1, batch):
            starts[i] = starts[i - 1] + sizes[i - 1]
        self._starts = torch.tensor(starts, **index)
        self._host_starts = starts
        self._host_lengths = [0] * batch
        self._lengths = torch.zeros(batch, **index)
        self._prefix = (None if prefix_lens is None else
                        torch.tensor([int(p) for p in prefix_lens], dtype=torch.int32,
                                     device=device))
        # Per-forward state, in buffers sized for the whole batch and sliced to the live count.
        self._live = torch.arange(batch, **index)         # live sequences' indices
        self._host_live = list(range(batch))
        self._live_start = torch.empty(batch, **index)    # their slot starts
        self._live_length = torch.empty(batch, **index)   # their cached rows before the forward
        self._dest = torch.empty(batch, **index)          # decode: each new row's cache row
        self._ones = torch.ones(batch, **index)
        self._cached = torch.zeros(2 * batch, dtype=torch.int32, device=device)
        self._cu_k = torch.zeros(2 * batch + 1, dtype=torch.int32, device=device)
        self._decode_cu_q = interleave_gaps(torch.arange(batch + 1, dtype=torch.int32,
                                                         device=device))
        self._prefix_live = torch.zeros(2 * batch, dtype=torch.int32, device=device)
        self._rows: torch.Tensor | None = None            # destination rows of this forward
        # This forward's cu_seqlens_k, one view handed to every layer: the kernels' value checks
        # read an unchanged tensor once (sphinx_kernels._validation.values_checked).
        self._forward_cu_k: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return len(self.slot_sizes)

    @property
    def live(self) -> list[int]:
        """Indices of the live sequences, in the order their rows are packed."""
        return list(self._host_live)

    def lengths(self) -> list[int]:
        """Rows cached per sequence (host ints; all ``B`` sequences)."""
        return list(self._host_lengths)

    def select(self, live: Sequence[int]) -> None:
        """Makes ``live`` (increasing sequence indices) the sequences of the next forwards."""
        live = [int(i) for i in live]
        if any(b <= a for a, b in itertools.pairwise(live)) or (
                live and not 0 <= live[0] <= live[-1] < self.batch_size):
            raise ValueError(f"live must be increasing indices in [0, {self.batch_size}), got "
                             f"{live}")
        m = len(live)
        self._host_live = live
        self._live[:m].copy_(torch.tensor(live, dtype=torch.int64))
        if self._prefix is not None:
            self._prefix_live[1:2 * m:2].copy_(self._prefix[self._live[:m]])

    def prefix_lens(self) -> torch.Tensor | None:
        """int32 ``[2m]``: the live sequences' prefix lengths in the interleaved layout (0 for the
        gaps), for the model's ``prefix_lens``; None without prefixes."""
        return None if self._prefix is None else self._prefix_live[:2 * len(self._host_live)]

    def begin_forward(self, new_rows: Sequence[int] | None = None) -> torch.Tensor:
        """Prepares a forward that brings ``new_rows[j]`` rows for live sequence ``j`` (None: one
        each, a decode step, done with in-place ops on preallocated buffers only) and returns its
        ``cu_seqlens`` (int32 ``[2m + 1]``, gaps interleaved) for the model. A ``ValueError`` names
        a sequence whose slot would overflow."""
        host_live = self._host_live
        m = len(host_live)
        live_ids = self._live[:m]
        counts = [1] * m if new_rows is None else [int(n) for n in new_rows]
        if len(counts) != m:
            raise ValueError(f"new_rows must have one count per live sequence ({m}), got "
                             f"{len(counts)}")
        before = [self._host_lengths[i] for i in host_live]
        for i, n, cached in zip(host_live, counts, before):
            if n < 0 or cached + n > self.slot_sizes[i]:
                raise ValueError(f"sequence {i}: {n} new rows after {cached} cached rows overflow "
                                 f"its slot of {self.slot_sizes[i]} rows")
        for i, n in zip(host_live, counts):
            self._host_lengths[i] += n
        start, length = self._live_start[:m], self._live_length[:m]
        torch.index_select(self._starts, 0, live_ids, out=start)
        torch.index_select(self._lengths, 0, live_ids, out=length)
        self._cached[1:2 * m:2].copy_(length)
        if new_rows is None:
            self._rows = torch.add(start, length, out=self._dest[:m])
            self._lengths.index_add_(0, live_ids, self._ones[:m])
            cu_q = self._decode_cu_q[:2 * m + 1]
        else:  # a prefill: each sequence's rows follow its cached ones
            rows = [self._host_starts[i] + cached + t
                    for i, n, cached in zip(host_live, counts, before) for t in range(n)]
            self._rows = torch.tensor(rows, dtype=torch.int64).to(start.device)
            self._lengths.index_add_(0, live_ids, torch.tensor(counts).to(start.device))
            bounds = [0] * (m + 1)
            for j, n in enumerate(counts):
                bounds[j + 1] = bounds[j] + n
            cu_q = interleave_gaps(torch.tensor(bounds, dtype=torch.int32).to(start.device))
        cu_k = self._forward_cu_k = self._cu_k[:2 * m + 1]
        cu_k[1::2].copy_(start)
        torch.index_select(self._lengths, 0, live_ids, out=length)
        cu_k[2::2].copy_(start.add_(length))  # start is scratch: it becomes each sequence's end
        return cu_q

    # The KVCache protocol (sphinx_model.llm.KVCache) ----------------------------------------------

    def cached_lengths(self) -> torch.Tensor:
        """int32 ``[2m]``: rows each packed sequence had cached before this forward (0 for gaps)."""
        return self._cached[:2 * len(self._host_live)]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Writes layer ``layer``'s new rows in place and returns the layer's whole key / value
        tensors ``[capacity, Hkv, D]``, ``cu_seqlens_k`` ``[2m + 1]`` and the capacity as the bound
        of the key lengths."""
        if self._rows is None:
            raise RuntimeError("begin_forward must be called before each forward")
        rows = self._rows.shape[0]
        self.keys[layer].index_copy_(0, self._rows, k[:rows])
        self.values[layer].index_copy_(0, self._rows, v[:rows])
        return self.keys[layer], self.values[layer], self._forward_cu_k, self.capacity
