"""Fuzzing the batch-preparation ops (plan_layout, pack_by_token_budget) on every backend: random
valid batches (empty samples, every index dtype and layout of every input) against the reference and
the ops' invariants, inputs never modified; every class of invalid input, expecting a TypeError /
ValueError naming the argument."""
from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st

from sphinx_kernels.ops.pack_by_token_budget import (
    PACK_BY_TOKEN_BUDGET_BACKENDS,
    pack_by_token_budget,
)
from sphinx_kernels.ops.plan_layout import (
    IGNORE_INDEX,
    PLAN_LAYOUT_BACKENDS,
    SOURCE_PADDING,
    LayoutInputs,
    plan_layout,
)
from tests.fuzz.harness import (
    BAD_INTS,
    INDEX_DTYPES,
    NOT_TENSORS,
    assert_bits,
    explore,
    explore_invalid,
    generator,
    layouts,
    plain,
    replacing,
    run_backends,
    seeds,
    with_layout,
)

CPU = torch.device("cpu")
META = torch.device("meta")
# Count and id tensors: any layout that keeps their values (an expanded count would change them).
COUNT_LAYOUTS = ("contiguous", "offset", "strided")

# ----------------------------------------------------------------------------------------------
# plan_layout

LAYOUT_BACKENDS = PLAN_LAYOUT_BACKENDS.available(PLAN_LAYOUT_BACKENDS.request(CPU, torch.int64))
LAYOUT_EXAMPLES = {"cpp": 70, "reference": 40}
FIELDS = LayoutInputs._fields


@st.composite
def layout_cases(draw):
    samples = []
    for _ in range(draw(st.integers(0, 5))):
        text = draw(st.integers(0, 6))
        images = [(draw(st.integers(1, 3)), draw(st.integers(1, 3)))
                  for _ in range(draw(st.integers(0, 2)))]
        samples.append(dict(text=text, images=images, before=draw(st.integers(0, text))))
    return dict(samples=samples, tokens_per_view=draw(st.integers(1, 4)),
                pad_multiple=draw(st.integers(1, 4)), length=draw(st.sampled_from((None, 0, 2))),
                dtypes=[draw(st.sampled_from(INDEX_DTYPES)) for _ in FIELDS],
                layouts=[draw(layouts(COUNT_LAYOUTS + ("expanded",))) for _ in FIELDS],
                before=draw(st.booleans()), seed=draw(seeds))


def layout_inputs_of(case) -> LayoutInputs:
    gen = generator(case["seed"])
    samples = case["samples"]
    lens = [s["text"] for s in samples]
    grids = [g for s in samples for g in s["images"]]
    tiles = sum(r * c for r, c in grids)
    columns = dict(
        text_ids=torch.randint(50, (sum(lens),), generator=gen), text_lens=torch.tensor(lens),
        answer_mask=torch.rand(sum(lens), generator=gen) < 0.6,
        images_per_sample=torch.tensor([len(s["images"]) for s in samples]),
        tile_grids=torch.tensor(grids).view(-1, 2), skipped_tiles=torch.rand(tiles, generator=gen)
        < 0.4, text_before_images=torch.tensor([s["before"] for s in samples]))
    fields = []
    for name, dtype, layout in zip(FIELDS, case["dtypes"], case["layouts"]):
        value = columns[name].view(-1, 2) if name == "tile_grids" else columns[name]
        if value.dtype != torch.bool:
            value = value.to(dtype)
        # Only the masks may be expanded (a constant mask is still a mask).
        if layout == "expanded" and value.dtype != torch.bool:
            layout = "strided"
        fields.append(with_layout(value.long() if name == "tile_grids" and dtype == torch.int64
                                  else value, layout))
    inputs = LayoutInputs(*fields)
    return inputs if case["before"] else inputs._replace(text_before_images=None)


def layout_length(case, inputs):
    """None, or a fixed row budget of the case's kind: the packed rows exactly, or 2 multiples of
    pad_multiple more."""
    if case["length"] is None:
        return None
    # Text, two markers per image, a row per skipped tile, tokens_per_view per kept view.
    images, tiles = inputs.tile_grids.shape[0], int(inputs.tile_grids.prod(dim=1).sum())
    skipped = int(inputs.skipped_tiles.sum())
    used = (int(inputs.text_lens.sum()) + 2 * images + skipped
            + (images + tiles - skipped) * case["tokens_per_view"])
    multiple = case["pad_multiple"]
    return -(-used // multiple) * multiple + case["length"] * multiple


def plain_inputs(inputs: LayoutInputs) -> LayoutInputs:
    return LayoutInputs(*(plain(t) for t in inputs))


def check_layout_invariants(layout, tokens_per_view, what):
    """What every packed layout satisfies, from its own fields (no reference involved)."""
    cu = layout.cu_seqlens.long()
    used, total = int(cu[-1]), layout.source_ids.shape[0]
    assert bool((cu[1:] >= cu[:-1]).all()) and int(cu[0]) == 0, f"{what}: cu_seqlens"
    padding = torch.arange(total) >= used
    assert bool((layout.source_ids[padding] == SOURCE_PADDING).all()), f"{what}: padding source"
    assert bool((layout.labels[padding] == IGNORE_INDEX).all()), f"{what}: padding labels"
    views = layout.view_starts.long()
    expected_rows = (views[:, None] + torch.arange(tokens_per_view)).reshape(-1)
    assert torch.equal(layout.visual_rows.long(), expected_rows), f"{what}: visual rows"


def check_plan_layout(backend, case):
    inputs = layout_inputs_of(case)
    length = layout_length(case, inputs)
    kwargs = dict(pad_multiple=case["pad_multiple"], length=length)
    expected = plan_layout(plain_inputs(inputs), case["tokens_per_view"], backend="reference",
                           **kwargs)

    def check(b, got):
        assert_bits(got, expected, expected._fields, f"plan_layout {b}")
        check_layout_invariants(got, case["tokens_per_view"], f"plan_layout {b}")
        if length is not None:
            assert got.source_ids.shape[0] == length, f"plan_layout {b}: rows"

    run_backends("plan_layout", [backend],
                 lambda b: plan_layout(inputs, case["tokens_per_view"], backend=b, **kwargs),
                 list(inputs), check)


@pytest.mark.parametrize("backend", LAYOUT_BACKENDS)
def test_plan_layout_valid(backend):
    explore(layout_cases(), lambda case: check_plan_layout(backend, case),
            LAYOUT_EXAMPLES[backend])


def layout_call(gen):
    long = torch.int64
    inputs = LayoutInputs(torch.randint(50, (5,), generator=gen), torch.tensor([2, 3]),
                          torch.tensor([True, False, True, True, False]), torch.tensor([1, 1]),
                          torch.tensor([[1, 2], [2, 1]]), torch.tensor([False, True, True, False]),
                          torch.tensor([1, 0], dtype=long))
    return dict(inputs=inputs, tokens_per_view=3, pad_multiple=1, length=None, backend=None)


def _field(name, make, error, label=""):
    def mutate(args):
        inputs = args["inputs"]
        args["inputs"] = inputs._replace(**{name: make(getattr(inputs, name))})
    return (f"inputs.{name}: {label}", mutate, error, f"inputs.{name}")


LAYOUT_MUTATIONS = [
    *replacing("inputs", [(lambda a: tuple(a["inputs"]), TypeError), (None, TypeError)]),
    *(mutation for name in FIELDS for mutation in (
        _field(name, lambda t: None, TypeError, "None") if name != "text_before_images" else
        _field(name, lambda t: t.float(), TypeError, "float"),
        _field(name, lambda t: t.float() if t.dtype != torch.bool else t.long(), TypeError,
               "dtype"),
        _field(name, lambda t: t[None], ValueError, "dims"),
        _field(name, lambda t: t.to(META), ValueError, "meta"))),
    _field("text_lens", lambda t: t - 3, ValueError, "negative"),
    _field("text_lens", lambda t: t + 1, ValueError, "sum mismatch"),
    _field("text_lens", lambda t: t[:1], ValueError, "shape"),
    _field("images_per_sample", lambda t: t - 2, ValueError, "negative"),
    # The count and the tile grids disagree: the message names both (tile_grids first).
    ("images_per_sample: sum mismatch", lambda a: a.update(inputs=a["inputs"]._replace(
        images_per_sample=a["inputs"].images_per_sample + 1)), ValueError, "images_per_sample"),
    _field("tile_grids", lambda t: t * 0, ValueError, "zero"),
    _field("skipped_tiles", lambda t: t[:-1], ValueError, "count"),
    _field("answer_mask", lambda t: t[:-1], ValueError, "count"),
    _field("text_ids", lambda t: t - 100, ValueError, "negative"),
    _field("text_ids", lambda t: t + 2**31, ValueError, "beyond int32"),
    _field("text_before_images", lambda t: t + 3, ValueError, "past the text"),
    _field("text_before_images", lambda t: t - 3, ValueError, "negative"),
    *replacing("tokens_per_view", BAD_INTS + [(0, ValueError), (2**31, ValueError)]),
    *replacing("pad_multiple", BAD_INTS + [(0, ValueError)]),
    *replacing("length", [(2.0, TypeError), (True, TypeError), ("9", TypeError), (-1, ValueError),
                          (2**70, ValueError), (2**31, ValueError), (1, ValueError)]),
    *replacing("backend", [(3, TypeError), ("triton", ValueError)]),
]


# Counts whose int64 sums wrap: they once crashed the C++ kernel, so they are fuzzed in a fresh
# interpreter (tests/fuzz/risky.py).
OVERFLOWING_MUTATIONS = [
    _field("text_lens", lambda t: t * 2**61, ValueError, "near 2^62"),
    _field("images_per_sample", lambda t: t + 2**62, ValueError, "near 2^62"),
    _field("tile_grids", lambda t: t * 2**32, ValueError, "2^32 sides"),
    _field("tile_grids", lambda t: t * 2**16, ValueError, "2^32 tiles"),
    _field("text_lens", lambda t: t + 2**31, ValueError, "2^31 tokens"),
]


def call_plan_layout(a):
    return plan_layout(a["inputs"], a["tokens_per_view"], pad_multiple=a["pad_multiple"],
                       length=a["length"], backend=a["backend"])


def test_plan_layout_invalid():
    explore_invalid("plan_layout", layout_call, LAYOUT_MUTATIONS, call_plan_layout, 6)


# ----------------------------------------------------------------------------------------------
# pack_by_token_budget

PACK_BACKENDS = PACK_BY_TOKEN_BUDGET_BACKENDS.available(
    PACK_BY_TOKEN_BUDGET_BACKENDS.request(CPU, torch.int64))
PACK_EXAMPLES = {"cpp": 120, "reference": 120}


@st.composite
def pack_cases(draw):
    budget = draw(st.integers(1, 60))
    lengths = draw(st.lists(st.integers(0, budget), max_size=30))
    return dict(lengths=lengths, budget=budget,
                form=draw(st.sampled_from(("list", "tuple", "int32", "int64"))),
                layout=draw(layouts(("contiguous", "offset", "strided", "expanded"))),
                batch=draw(st.sampled_from((None, 1, 3, 2**70))))


def fixed_batch_padding(lengths, batch):
    """The baseline's padding, by its definition: consecutive batches, each padded to its
    longest."""
    batches = [lengths[i:i + batch] for i in range(0, len(lengths), batch)]
    return sum(max(b) * len(b) - sum(b) for b in batches if b)


def check_pack(backend, case):
    lengths, budget = case["lengths"], case["budget"]
    if case["form"] in ("list", "tuple"):
        given = list(lengths) if case["form"] == "list" else tuple(lengths)
    else:
        given = with_layout(torch.tensor(lengths, dtype=getattr(torch, case["form"])),
                            case["layout"])
        lengths = given.tolist()
    expected = pack_by_token_budget(torch.tensor(lengths, dtype=torch.int64), budget,
                                    baseline_batch_size=case["batch"], backend="reference")

    def check(b, got):
        assert_bits(got[:4], expected[:4], got._fields[:4], f"pack_by_token_budget {b}")
        assert got[4:] == expected[4:], f"pack_by_token_budget {b}: {got[4:]} != {expected[4:]}"
        assert sorted(got.order.tolist()) == list(range(len(lengths)))
        assert bool((got.bin_tokens <= budget).all())
        assert got.padding_tokens == got.num_bins * budget - sum(lengths)
        batch = min(got.baseline_batch_size, max(len(lengths), 1))
        assert got.baseline_padding_tokens == fixed_batch_padding(lengths, batch)

    run_backends("pack_by_token_budget", [backend],
                 lambda b: pack_by_token_budget(given, budget, baseline_batch_size=case["batch"],
                                                backend=b), [given], check)


@pytest.mark.parametrize("backend", PACK_BACKENDS)
def test_pack_by_token_budget_valid(backend):
    explore(pack_cases(), lambda case: check_pack(backend, case), PACK_EXAMPLES[backend])


def pack_call(gen):
    return dict(lengths=torch.randint(9, (6,), generator=gen), budget=10,
                baseline_batch_size=None, backend=None)


PACK_MUTATIONS = [
    *replacing("lengths", NOT_TENSORS[:1] + NOT_TENSORS[2:] + [
        (lambda a: a["lengths"].float(), TypeError), (lambda a: a["lengths"][None], ValueError),
        (lambda a: a["lengths"] - 20, ValueError), (lambda a: a["lengths"] + 11, ValueError),
        (lambda a: a["lengths"].to(META), ValueError), ([1.5, 2], TypeError),
        ([1, True], TypeError), ([3, 2**70], ValueError), ([3, -(2**70)], ValueError),
        ([3, "4"], TypeError)]),
    *replacing("budget", BAD_INTS + [(0, ValueError), (2**31, ValueError)]),
    *replacing("baseline_batch_size", [(2.0, TypeError), (True, TypeError), (0, ValueError),
                                       (-(2**70), ValueError), ("3", TypeError)]),
    *replacing("backend", [(3, TypeError), ("triton", ValueError)]),
]


def test_pack_by_token_budget_invalid():
    explore_invalid("pack_by_token_budget", pack_call, PACK_MUTATIONS,
                    lambda a: pack_by_token_budget(a["lengths"], a["budget"],
                                                   baseline_batch_size=a["baseline_batch_size"],
                                                   backend=a["backend"]), 10)


@pytest.mark.parametrize("mutations,call", [(LAYOUT_MUTATIONS, layout_call),
                                            (PACK_MUTATIONS, pack_call)])
def test_every_argument_has_invalid_cases(mutations, call):
    """A new argument of an op above gets its invalid cases here."""
    named = {name.split(".")[0] for _, _, _, name in mutations}
    assert not set(call(generator(0))) - named
