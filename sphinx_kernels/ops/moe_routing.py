"""``moe_routing``: the routing plan of top-k choices. Tokens per expert, block-padded expert
segments and each (token, slot) pair's row in expert-grouped order, from a histogram, a prefix sum
and a scatter: no sort, no host sync, static shapes (the grouped row count is
:func:`padded_rows_bound`).

Backends: ``cuda`` and ``cpp`` (``csrc/moe/``), ``triton``
(``sphinx_kernels/triton/moe_routing.py``), ``reference`` (:func:`moe_routing_reference`). Data
only: no autograd.

Expert parallelism would enter at the plan: with experts sharded over ranks, the grouped rows of
``moe_permute`` are exchanged by an all-to-all (each rank sending ``padded_offsets``-delimited
segments to the rank owning those experts, after exchanging ``tokens_per_expert``),
``moe_expert_mlp`` runs on the local experts' rows with a local plan, and the reverse all-to-all
precedes ``moe_unpermute``. Nothing here assumes all experts are local beyond the shapes passed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from sphinx_kernels._validation import (
    INDEX_DTYPES,
    INT32_MAX,
    host_values,
    mark_index_range_checked,
    mark_values_checked,
    require_device,
    require_index_range,
    require_int,
    require_tensor,
    should_check_values,
    values_checked,
)
from sphinx_kernels.backends import Backend, Impl, OpBackends, Request
from sphinx_kernels.dtypes import FLOAT_DTYPES
from sphinx_kernels.kernel_op import kernel_op
from sphinx_kernels.platforms import CPP, CUDA, REFERENCE, TRITON, native_ops, triton_module

__all__ = ["RoutingPlan", "MoeRoutingRequest", "moe_routing", "moe_routing_reference",
           "padded_rows_bound", "require_plan_rows", "require_plan_segments",
           "MOE_ROUTING_BACKENDS", "MAX_NATIVE_ROUTING_EXPERTS"]


class RoutingPlan(NamedTuple):
    """Where every (token, slot) pair goes in expert-grouped, block-padded order (int32 tensors).

    Expert ``e`` owns rows ``padded_offsets[e]:padded_offsets[e + 1]``: its
    ``tokens_per_expert[e]`` pairs in (token, slot) order, then zero rows up to a multiple of the
    block size. Rows past ``padded_offsets[E]`` (up to the static bound ``R``) are padding too.
    """

    tokens_per_expert: torch.Tensor  # [E]
    padded_offsets: torch.Tensor     # [E + 1], padded_offsets[0] == 0, multiples of block_size
    position: torch.Tensor           # [T, k]: row of pair (t, j), in [0, R)
    row_to_pair: torch.Tensor        # [R]: pair t * k + j held by the row, -1 for a padding row

    @property
    def num_padded_rows(self) -> int:
        """``R``, the static number of grouped rows (an upper bound of ``padded_offsets[E]``)."""
        return self.row_to_pair.shape[0]


def padded_rows_bound(num_pairs: int, num_experts: int, block_size: int) -> int:
    """``R``: the largest multiple of ``block_size`` that every routing of ``num_pairs`` pairs to
    ``num_experts`` experts may need (each expert wastes at most ``block_size - 1`` rows), known
    from shapes alone so that no op needs a host sync."""
    return (num_pairs + num_experts * (block_size - 1)) // block_size * block_size


@dataclass(frozen=True)
class MoeRoutingRequest(Request):
    """What selects a ``moe_routing`` backend besides device and dtype. The default is Mixtral's."""

    num_experts: int = 8


def moe_routing(expert_ids: torch.Tensor, num_experts: int, *, block_size: int = 128,
                backend: str | None = None) -> RoutingPlan:
    """The routing plan of top-k choices: a histogram, a prefix sum and a scatter (no global sort).

    Args:
        expert_ids: ``[T, k]`` int32 or int64 expert of each (token, slot) pair, in
            ``[0, num_experts)`` (``Gating.expert_ids``); ``T`` may be 0.
        num_experts: ``E``, 1 to 2^31 - 1.
        block_size: rows of one expert GEMM block: each expert's segment is padded to a multiple
            (1 to 2^31 - 1; the plan's rows are int32, so ``R`` must stay below 2^31).
        backend: force one of ``MOE_ROUTING_BACKENDS.names``.

    Returns:
        :class:`RoutingPlan` of int32 tensors on ``expert_ids``'s device, with
        ``R = padded_rows_bound(T * k, E, block_size)`` grouped rows: static shapes, no host sync.
        Pairs of one expert keep (token, slot) order (stable); experts with no pair own no rows.
        Data only: no autograd.

    Expert ids are validated on the CPU; on a GPU only with ``SPHINX_KERNELS_CHECK_INPUTS=1``, and a
    pair with an out-of-range id that reaches a kernel is placed nowhere (position -1).
    """
    _check_moe_routing(expert_ids, num_experts, block_size)
    request = MOE_ROUTING_BACKENDS.request(expert_ids.device, expert_ids.dtype,
                                           num_experts=num_experts)
    chosen = MOE_ROUTING_BACKENDS.select(request, backend)
    plan = RoutingPlan(*_moe_routing_op(expert_ids, num_experts, block_size, chosen.name))
    if should_check_values(expert_ids):  # the ids were checked: the plan is valid by construction
        _mark_plan_checked(plan)
    return plan


def _padded_offsets(tokens_per_expert: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[E + 1]`` int32 starts of the experts' segments, each padded to a multiple of
    ``block_size``."""
    padded = (tokens_per_expert + block_size - 1) // block_size * block_size
    return torch.nn.functional.pad(torch.cumsum(padded, 0, dtype=torch.int32), (1, 0))


def moe_routing_reference(expert_ids: torch.Tensor, num_experts: int,
                          block_size: int = 128) -> RoutingPlan:
    """Pure-PyTorch ``moe_routing``: a one-hot running count gives each pair's stable rank."""
    flat = expert_ids.reshape(-1).long()
    one_hot = torch.nn.functional.one_hot(flat, num_experts)
    tokens_per_expert = one_hot.sum(0, dtype=torch.int32)
    padded_offsets = _padded_offsets(tokens_per_expert, block_size)
    rank = (one_hot.cumsum(0) - 1).gather(1, flat[:, None]).squeeze(1)
    position = padded_offsets[:-1].long()[flat] + rank
    num_rows = padded_rows_bound(flat.shape[0], num_experts, block_size)
    row_to_pair = torch.full((num_rows,), -1, dtype=torch.int32, device=flat.device)
    row_to_pair[position] = torch.arange(flat.shape[0], dtype=torch.int32, device=flat.device)
    return RoutingPlan(tokens_per_expert, padded_offsets, position.int().view(expert_ids.shape),
                       row_to_pair)


def _triton_forward(expert_ids, num_experts, block_size):
    return triton_module("moe_routing").moe_routing(
        expert_ids, num_experts, lambda counts: _padded_offsets(counts, block_size),
        padded_rows_bound(expert_ids.numel(), num_experts, block_size))


def _native_forward(expert_ids, num_experts, block_size):
    return native_ops().moe_routing_native(
        expert_ids=expert_ids, num_experts=num_experts, block_size=block_size,
        num_rows=padded_rows_bound(expert_ids.numel(), num_experts, block_size))


def _reference_forward(expert_ids, num_experts, block_size):
    return tuple(moe_routing_reference(expert_ids, num_experts, block_size))


# The compiled kernels keep a counter per expert in shared memory (csrc/moe/moe.h).
MAX_NATIVE_ROUTING_EXPERTS = 8192


def _native_reasons(request: MoeRoutingRequest) -> list[str]:
    if request.num_experts > MAX_NATIVE_ROUTING_EXPERTS:
        return [f"num_experts {request.num_experts} > {MAX_NATIVE_ROUTING_EXPERTS}"]
    return []


# Impl: forward(expert_ids, num_experts, block_size) -> the RoutingPlan fields in order.
MOE_ROUTING_BACKENDS = OpBackends("moe_routing", [
    Backend(CUDA, Impl(_native_forward), INDEX_DTYPES, _native_reasons),
    Backend(CPP, Impl(_native_forward), INDEX_DTYPES, _native_reasons),
    Backend(TRITON, Impl(_triton_forward), INDEX_DTYPES),
    Backend(REFERENCE, Impl(_reference_forward), INDEX_DTYPES),
], request_type=MoeRoutingRequest)


@kernel_op("sphinx_kernels::moe_routing")
def _moe_routing_op(expert_ids: torch.Tensor, num_experts: int, block_size: int, backend: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(MOE_ROUTING_BACKENDS[backend].impl.forward(
        expert_ids=expert_ids, num_experts=num_experts, block_size=block_size))


@_moe_routing_op.register_fake
def _(expert_ids, num_experts, block_size, backend):
    num_rows = padded_rows_bound(expert_ids.numel(), num_experts, block_size)
    def new(*shape):
        return expert_ids.new_empty(shape, dtype=torch.int32)
    return new(num_experts), new(num_experts + 1), new(*expert_ids.shape), new(num_rows)


def _check_moe_routing(expert_ids, num_experts, block_size) -> None:
    require_tensor("expert_ids", expert_ids, dims=2, dtypes=INDEX_DTYPES)
    require_int("num_experts", num_experts, minimum=1, maximum=INT32_MAX)
    require_int("block_size", block_size, minimum=1, maximum=INT32_MAX)
    if expert_ids.shape[1] < 1:
        raise ValueError(f"expert_ids must be [T, k] with k >= 1, got shape "
                         f"{tuple(expert_ids.shape)}")
    if padded_rows_bound(expert_ids.numel(), num_experts, block_size) >= 2**31:
        raise ValueError("expert_ids, num_experts and block_size need more than 2^31 grouped rows; "
                         "int32 row indices cannot address them")
    require_index_range("expert_ids", expert_ids, num_experts, "num_experts")


def _segments_check(num_rows: int) -> tuple:
    return ("moe_plan_segments", num_rows)


def _mark_plan_checked(plan: RoutingPlan) -> None:
    """Records the checks of :func:`require_plan_rows` and :func:`require_plan_segments` as passed
    for a plan that ``moe_routing`` built from checked ids, so that ``moe_permute``,
    ``moe_expert_mlp`` and ``moe_unpermute`` do not each read it back (see
    ``sphinx_kernels._validation.values_checked``)."""
    mark_index_range_checked(plan.position, plan.num_padded_rows)
    mark_index_range_checked(plan.row_to_pair, plan.position.numel(), lowest=-1)
    mark_values_checked(_segments_check(plan.num_padded_rows), plan.padded_offsets,
                        plan.tokens_per_expert)


def require_plan_rows(name: str, rows, plan, *, rows_of: str) -> None:
    """The checks of an op that takes rows and the routing plan that orders them: ``rows``
    ``[N, H]`` float on the plan's device, ``N`` matching ``plan.<rows_of>``'s first dim, the plan's
    positions and pairs in range."""
    require_tensor(name, rows, dims=2, dtypes=FLOAT_DTYPES)
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a RoutingPlan (from moe_routing), got {type(plan).__name__}")
    for field, dims in (("position", 2), ("row_to_pair", 1)):
        require_tensor(f"plan.{field}", getattr(plan, field), dims=dims, dtypes=(torch.int32,))
        require_device(f"plan.{field}", getattr(plan, field), rows.device, name)
    expected = getattr(plan, rows_of).shape[0]
    if rows.shape[0] != expected:
        raise ValueError(f"{name} has {rows.shape[0]} rows but plan.{rows_of} has {expected}; "
                         "the plan must come from this batch")
    if should_check_values(plan.position, plan.row_to_pair):
        require_index_range("plan.position", plan.position, plan.row_to_pair.shape[0], "R",
                            "R = plan.row_to_pair rows", checked=True)
        require_index_range("plan.row_to_pair", plan.row_to_pair, plan.position.numel(), "T * k",
                            "-1: a padding row", lowest=-1, checked=True)


def require_plan_segments(plan: RoutingPlan, num_rows: int) -> None:
    """The value checks of an op that reads the plan's expert segments (``moe_expert_mlp``) on
    ``num_rows`` grouped rows: counts >= 0, offsets from 0 that leave each expert room for its
    rows and end at most at ``num_rows``. Metadata is the caller's to check."""
    segments = (plan.padded_offsets, plan.tokens_per_expert)
    check = _segments_check(num_rows)
    if not should_check_values(*segments) or values_checked(check, *segments):
        return
    offsets, counts = host_values(plan.padded_offsets), host_values(plan.tokens_per_expert)
    if counts.size and counts.min() < 0:
        raise ValueError(f"plan.tokens_per_expert must be >= 0, got {int(counts.min())}")
    if (offsets[1:] - offsets[:-1] < counts).any() or offsets[0] != 0 or offsets[-1] > num_rows:
        raise ValueError("plan.padded_offsets must start at 0, leave each expert room for its "
                         f"tokens_per_expert and end at most at R = {num_rows}; the plan must "
                         "come from moe_routing")
    mark_values_checked(check, *segments)
