"""pack_by_token_budget: every backend against the textbook first-fit-decreasing scan and a
hand-written example, the C++ kernel against the reference at scale, the reported padding, bad
inputs, opcheck."""
from __future__ import annotations

import random
import re

import pytest
import torch

from sphinx_kernels.ops.pack_by_token_budget import (
    PACK_BY_TOKEN_BUDGET_BACKENDS,
    pack_by_token_budget,
)

PACK_BACKENDS = PACK_BY_TOKEN_BUDGET_BACKENDS.available(
    PACK_BY_TOKEN_BUDGET_BACKENDS.request("cpu", torch.int64))


def naive_ffd(lengths: list[int], budget: int) -> list[int]:
    """First-fit decreasing, the textbook way: scan every open bin for each sample."""
    free, bins = [], [0] * len(lengths)
    for sample in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, room in enumerate(free):
            if room >= lengths[sample]:
                break
        else:
            b = len(free)
            free.append(budget)
        free[b] -= lengths[sample]
        bins[sample] = b
    return bins


@pytest.mark.parametrize("backend", PACK_BACKENDS)
def test_ffd_matches_the_naive_scan_and_its_properties(backend, seed):
    rng = random.Random(seed)
    for trial in range(8):
        budget = rng.choice([1, 7, 64, 2048])
        num = rng.choice([0, 1, 5, 97, 600])
        lengths = [rng.choice([0, budget, rng.randrange(budget + 1)]) for _ in range(num)]
        packing = pack_by_token_budget(lengths, budget, backend=backend)
        what = f"seed {seed} trial {trial}"
        assert packing.bin_ids.tolist() == naive_ffd(lengths, budget), what
        # Every sample in exactly one bin, bins in placement order, none over budget.
        assert sorted(packing.order.tolist()) == list(range(num)), what
        counts = torch.bincount(packing.bin_ids, minlength=packing.num_bins)
        assert packing.bin_offsets.tolist() == [0] + torch.cumsum(counts, 0).tolist(), what
        for b in range(packing.num_bins):
            members = packing.order[packing.bin_offsets[b]:packing.bin_offsets[b + 1]].tolist()
            assert all(packing.bin_ids[m] == b for m in members), what
            assert members == sorted(members, key=lambda i: (-lengths[i], i)), what
            assert int(packing.bin_tokens[b]) == sum(lengths[m] for m in members) <= budget, what
        assert packing.padding_tokens == packing.num_bins * budget - sum(lengths), what


def test_ffd_hand_example_and_reported_padding():
    for backend in PACK_BACKENDS:
        packing = pack_by_token_budget(torch.tensor([5, 3, 7, 2, 2, 8, 0], dtype=torch.int32), 10,
                                       backend=backend)
        # Placed 8, 7, 5, 3, 2, 2, 0: bins {8, 2, 0}, {7, 3}, {5, 2}.
        assert packing.bin_ids.tolist() == [2, 1, 1, 0, 2, 0, 0]
        assert packing.order.tolist() == [5, 3, 6, 2, 1, 0, 4]
        assert packing.bin_offsets.tolist() == [0, 3, 5, 7]
        assert packing.bin_tokens.tolist() == [10, 10, 7]
        # 3 bins of 10 hold 27 tokens; batches of ceil(7 / 3) = 3 padded to their longest:
        # [5, 3, 7] -> 6, [2, 2, 8] -> 12, [0] -> 0.
        assert (packing.padding_tokens, packing.baseline_batch_size,
                packing.baseline_padding_tokens, packing.saved_padding_tokens) == (3, 3, 18, 15)
        again = pack_by_token_budget([5, 3, 7, 2, 2, 8, 0], 10, baseline_batch_size=2,
                                     backend=backend)
        assert again.baseline_padding_tokens == 2 + 5 + 6 + 0  # [5, 3], [7, 2], [2, 8], [0]


@pytest.mark.skipif("cpp" not in PACK_BACKENDS, reason="sphinx_kernels._C is not built")
def test_ffd_cpp_equals_reference_at_scale(seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(32, 2049, (20000,), generator=gen)
    cpp = pack_by_token_budget(lengths, 8192, backend="cpp")
    reference = pack_by_token_budget(lengths, 8192, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(cpp[:4], reference[:4])), f"seed {seed}"
    assert cpp.padding_tokens < 0.01 * 8192 * cpp.num_bins, f"seed {seed}: FFD packs tightly"


BAD_PACKINGS = [
    (lambda: ([3, 11, 2], 10), ValueError, "lengths[1] = 11 exceeds budget = 10"),
    (lambda: ([3, -1], 10), ValueError, "lengths must be >= 0"),
    (lambda: ([3], 0), ValueError, "budget must be >= 1"),
    (lambda: ([3], 2.5), TypeError, "budget must be an int"),
    (lambda: (torch.tensor([1.0]), 4), TypeError, "lengths must have dtype"),
    (lambda: (torch.tensor([[1]]), 4), ValueError, "lengths must be 1-D"),
    # Sizes that once wrapped in int64 sums or reached the op's schema as ints beyond int64.
    (lambda: ([2**62, 2**62], 2**62), ValueError, "budget must be <= 2147483647"),
    (lambda: ([1], 2**70), ValueError, "budget must be <= 2147483647"),
    (lambda: ([1, 2**70], 4), ValueError, "lengths[1] = 1180591620717411303424 exceeds budget"),
    # Values that were once truncated or taken as ints.
    (lambda: ([1.7, 2.2], 4), TypeError, "lengths[0] must be an int, got float"),
    (lambda: ([1, True], 4), TypeError, "lengths[1] must be an int, got bool"),
    (lambda: ([1], True), TypeError, "budget must be an int, got bool"),
]


@pytest.mark.parametrize("make_bad,error,message", BAD_PACKINGS)
def test_bad_packing_input_raises_naming_the_argument(make_bad, error, message):
    with pytest.raises(error, match=re.escape(message)):
        pack_by_token_budget(*make_bad())


def test_baseline_batch_size_beyond_the_samples_is_one_batch():
    """A baseline batch larger than the samples (up to ints beyond int64) is one batch of them."""
    lengths = [5, 3, 7, 2]
    whole = pack_by_token_budget(lengths, 10, baseline_batch_size=4)
    for size in (5, 2**70):
        packing = pack_by_token_budget(lengths, 10, baseline_batch_size=size)
        assert packing.baseline_padding_tokens == whole.baseline_padding_tokens
        assert packing.baseline_batch_size == size


@pytest.mark.parametrize("backend", PACK_BACKENDS)
def test_pack_opcheck(backend):
    lengths = torch.tensor([5, 3, 7, 2, 2, 8, 0, 9, 1])
    torch.library.opcheck(torch.ops.sphinx_kernels.pack_by_token_budget.default,
                          (lengths, 10, backend))
