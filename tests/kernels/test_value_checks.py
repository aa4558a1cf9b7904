"""Value checks read an index tensor back once while it stays unchanged: an unchanged tensor is not
read again, one written in place is (and a bad value then raises), inference tensors (no version
counter) are read every time, and the outputs of topk_gating and moe_routing need no read-back in
the ops they feed. Reads are counted through ``host_values``, which every value check goes
through."""
from __future__ import annotations

import pytest
import torch

import sphinx_kernels
from sphinx_kernels import _validation
from sphinx_kernels._validation import require_index_range


def test_an_unchanged_tensor_is_read_once(index_reads):
    ids = torch.tensor([0, 3, 2])
    for _ in range(3):
        require_index_range("ids", ids, 4, "E")
    assert index_reads() == 1
    require_index_range("ids", ids, 8, "E")  # another bound is another check
    assert index_reads() == 2


def test_a_tensor_written_in_place_is_read_again(index_reads):
    ids = torch.tensor([0, 3, 2])
    require_index_range("ids", ids, 4, "E")
    ids[1:][0] = 5  # through a view: views share the version counter
    with pytest.raises(ValueError, match=r"ids must be in \[0, E\) = \[0, 4\)"):
        require_index_range("ids", ids, 4, "E")
    assert index_reads() == 2


def test_a_full_memory_forgets_dead_tensors_first(index_reads, monkeypatch):
    monkeypatch.setattr(_validation, "_CHECKED_CAPACITY", 8)
    kept = torch.tensor([1, 2])
    require_index_range("ids", kept, 4, "E")
    for bound in range(5, 25):  # checked, then gone (a decode step's indices); each its own entry
        require_index_range("ids", torch.tensor([0]), bound, "E")
    require_index_range("ids", kept, 4, "E")
    assert index_reads() == 1 + 20


def test_inference_tensors_are_read_every_time(index_reads):
    with torch.inference_mode():
        ids = torch.tensor([0, 3, 2])
    for _ in range(3):
        require_index_range("ids", ids, 4, "E")
    assert index_reads() == 3


def routed(num_tokens=6, num_experts=4, k=2, block_size=4):
    gen = torch.Generator().manual_seed(0)
    gating = sphinx_kernels.topk_gating(torch.randn(num_tokens, num_experts, generator=gen), k)
    return gating, sphinx_kernels.moe_routing(gating.expert_ids, num_experts, block_size=block_size)


def test_the_moe_chain_reads_no_index_back(index_reads):
    x = torch.randn(6, 8)
    w1, w3, w2 = torch.randn(4, 16, 8), torch.randn(4, 16, 8), torch.randn(4, 8, 16)
    gating, plan = routed()
    grouped = sphinx_kernels.moe_expert_mlp(sphinx_kernels.moe_permute(x, plan), w1, w3, w2, plan)
    sphinx_kernels.moe_unpermute(grouped, plan, gating.weights)
    assert index_reads() == 0


def test_a_plan_written_in_place_is_checked_again():
    _, plan = routed()
    sphinx_kernels.moe_permute(torch.randn(6, 8), plan)
    plan.position[2, 1] = plan.num_padded_rows
    with pytest.raises(ValueError, match=r"plan.position must be in \[0, R\)"):
        sphinx_kernels.moe_permute(torch.randn(6, 8), plan)


def test_gating_ids_written_in_place_are_checked_again():
    gating, _ = routed()
    gating.expert_ids[0, 0] = 4
    with pytest.raises(ValueError, match=r"expert_ids must be in \[0, num_experts\)"):
        sphinx_kernels.moe_routing(gating.expert_ids, 4, block_size=4)


def test_varlen_offsets_are_read_once_per_change(index_reads):
    q = torch.randn(5, 2, 8)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    sphinx_kernels.varlen_attention(q, q, q, cu, causal=True)
    first = index_reads()  # cu_seqlens_q, and the same tensor as cu_seqlens_k
    for _ in range(3):
        sphinx_kernels.varlen_attention(q, q, q, cu, causal=True)
    assert first > 0 and index_reads() == first
    cu[1] = 6  # no longer non-decreasing
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        sphinx_kernels.varlen_attention(q, q, q, cu, causal=True)
