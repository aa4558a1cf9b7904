"""plan_layout: every backend against a plain per-sample Python loop and hand-written examples, the
C++ kernel against the reference on random batches, label and padding properties, gather_rows fed by
the layout, bad inputs, opcheck."""
from __future__ import annotations

import random
import re

import pytest
import torch

import sphinx_kernels
from sphinx_kernels.ops.plan_layout import (
    IGNORE_INDEX,
    PLAN_LAYOUT_BACKENDS,
    SOURCE_IMAGE_BEGIN,
    SOURCE_IMAGE_END,
    SOURCE_PADDING,
    SOURCE_SKIP,
    SOURCE_TEXT,
    SOURCE_VISUAL,
    ImageSpec,
    LayoutInputs,
    SampleSpec,
    layout_inputs,
    plan_layout,
)
from tests.variants import run_isolated

LAYOUT_BACKENDS = PLAN_LAYOUT_BACKENDS.available(PLAN_LAYOUT_BACKENDS.request("cpu", torch.int64))

def random_samples(rng: random.Random, num_samples: int, vocab: int = 50) -> list[SampleSpec]:
    """A mix with the edge cases: empty samples, text only, images only, all tiles skipped."""
    samples = []
    for _ in range(num_samples):
        kind = rng.random()
        text_len = 0 if kind < 0.15 else rng.randrange(0, 12)
        num_images = 0 if 0.15 <= kind < 0.35 else rng.randrange(0, 4)
        images = []
        for _ in range(num_images):
            rows, cols = rng.randrange(1, 4), rng.randrange(1, 4)
            p_skip = rng.choice([0.0, 0.3, 1.0])
            skipped = [rng.random() < p_skip for _ in range(rows * cols)]
            images.append(ImageSpec(rows, cols, skipped))
        # Half the samples put some of their text (a BOS, say) before their images.
        before = rng.randrange(0, text_len + 1) if rng.random() < 0.5 else 0
        samples.append(SampleSpec([rng.randrange(vocab) for _ in range(text_len)],
                                  [rng.random() < 0.6 for _ in range(text_len)], images, before))
    return samples


def loop_layout(samples: list[SampleSpec], tokens_per_view: int):
    """The contract, one row at a time: (source, row, position, label) lists and the visual rows."""
    sources, rows, positions, sample_of_row, answer = [], [], [], [], []
    visual_rows, view_starts = [], []
    cu = [0]
    for b, sample in enumerate(samples):
        start = len(sources)

        def put(source, row, is_answer=False):
            positions.append(len(sources) - start)
            sources.append(source)
            rows.append(row)
            sample_of_row.append(b)
            answer.append(is_answer)

        def put_view():
            view_starts.append(len(sources))
            for _ in range(tokens_per_view):
                visual_rows.append(len(sources))
                put(SOURCE_VISUAL, len(visual_rows) - 1)

        answers = sample.answer or [False] * len(sample.text)
        text = list(zip(sample.text, answers))
        for token, is_answer in text[:sample.text_before_images]:
            put(SOURCE_TEXT, token, is_answer)
        for image in sample.images:
            put(SOURCE_IMAGE_BEGIN, 0)
            put_view()
            for skipped in image.skipped or [False] * (image.rows * image.cols):
                put(SOURCE_SKIP, 0) if skipped else put_view()
            put(SOURCE_IMAGE_END, 0)
        for token, is_answer in text[sample.text_before_images:]:
            put(SOURCE_TEXT, token, is_answer)
        cu.append(len(sources))
    labels = [rows[t + 1] if t + 1 < len(rows) and answer[t + 1]
              and sample_of_row[t + 1] == sample_of_row[t] else IGNORE_INDEX
              for t in range(len(rows))]
    return cu, positions, sources, rows, labels, visual_rows, view_starts


def assert_layout_equals_loop(layout, samples, tokens_per_view, what):
    cu, positions, sources, rows, labels, visual_rows, view_starts = loop_layout(samples,
                                                                                 tokens_per_view)
    used = cu[-1]
    pad = layout.source_ids.shape[0] - used
    assert pad >= 0, what
    assert layout.cu_seqlens.dtype == torch.int32 and layout.cu_seqlens.tolist() == cu, what
    assert layout.position_ids.tolist() == positions + [0] * pad, what
    assert layout.source_ids.tolist() == sources + [SOURCE_PADDING] * pad, what
    assert layout.row_ids.tolist() == rows + [0] * pad, what
    assert layout.labels.tolist() == labels + [IGNORE_INDEX] * pad, what
    assert layout.visual_rows.tolist() == visual_rows, what
    assert layout.view_starts.tolist() == view_starts, what
    for name in ("position_ids", "source_ids", "row_ids", "visual_rows", "view_starts"):
        assert getattr(layout, name).dtype == torch.int32, (what, name)
    assert layout.labels.dtype == torch.int64, what  # what cross_entropy requires


def test_hand_written_example():
    """tokens_per_view 2; four samples, padded to a multiple of 4 (the expected rows written
    out)."""
    samples = [
        SampleSpec([5, 6, 7], [False, True, True], [ImageSpec(1, 2, [False, True])]),
        SampleSpec([8, 9], [True, True]),
        SampleSpec(),                                        # an empty sample
        SampleSpec(images=[ImageSpec(1, 1, [True])]),        # one image, its only tile skipped
    ]
    V, S, B, E, P, X = SOURCE_VISUAL, SOURCE_SKIP, SOURCE_IMAGE_BEGIN, SOURCE_IMAGE_END, -1, -100
    for backend in LAYOUT_BACKENDS:
        layout = plan_layout(layout_inputs(samples), 2, pad_multiple=4, backend=backend)
        assert layout.cu_seqlens.tolist() == [0, 10, 12, 12, 17]
        assert layout.source_ids.tolist() == [
            B, V, V, V, V, S, E, 0, 0, 0,  # sample 0: begin, global view, tile 0, skip, end, text
            0, 0,                          # sample 1
            B, V, V, S, E,                 # sample 3 (sample 2 is empty)
            P, P, P]                       # padding
        assert layout.row_ids.tolist() == [0, 0, 1, 2, 3, 0, 0, 5, 6, 7,
                                           8, 9,
                                           0, 4, 5, 0, 0,
                                           0, 0, 0]
        assert layout.position_ids.tolist() == list(range(10)) + [0, 1] + list(range(5)) + [0] * 3
        assert layout.labels.tolist() == [X] * 7 + [6, 7, X, 9] + [X] * 9
        assert layout.visual_rows.tolist() == [1, 2, 3, 4, 13, 14]
        assert layout.view_starts.tolist() == [1, 3, 13]
        assert layout.num_kept_views == 3 and layout.num_skipped_tiles == 2


def test_hand_written_example_with_text_before_the_images():
    """A BOS before the image block (where the SPHINX reference puts it), answers right after the
    end marker and right before the begin marker, tokens_per_view 1."""
    samples = [SampleSpec([1, 5, 6], [False, True, True], [ImageSpec(1, 1, [False])], 1),
               SampleSpec([1, 7], [True, True], [ImageSpec(1, 1, [True])], 2),   # all text first
               SampleSpec([1, 8], [False, True], [], 1)]                        # no image
    V, S, B, E, X = SOURCE_VISUAL, SOURCE_SKIP, SOURCE_IMAGE_BEGIN, SOURCE_IMAGE_END, -100
    for backend in LAYOUT_BACKENDS:
        layout = plan_layout(layout_inputs(samples), 1, backend=backend)
        assert layout.cu_seqlens.tolist() == [0, 7, 13, 15]
        assert layout.source_ids.tolist() == [0, B, V, V, E, 0, 0,  # sample 0: bos, image, text
                                              0, 0, B, V, S, E,     # sample 1: bos 7, image
                                              0, 0]                 # sample 2: text
        assert layout.row_ids.tolist() == [1, 0, 0, 1, 0, 5, 6, 1, 7, 0, 2, 0, 0, 1, 8]
        assert layout.labels.tolist() == [X, X, X, X, 5, 6, X, 7, X, X, X, X, X, 8, X]
        assert layout.position_ids.tolist() == list(range(7)) + list(range(6)) + [0, 1]
        assert layout.visual_rows.tolist() == [2, 3, 10]


@pytest.mark.parametrize("backend", LAYOUT_BACKENDS)
def test_random_batches_equal_the_loop(backend, seed):
    rng = random.Random(seed)
    for trial in range(6):
        samples = random_samples(rng, rng.choice([0, 1, 7, 40]))
        tpv = rng.choice([1, 3, 5])
        pad_multiple = rng.choice([1, 8])
        layout = plan_layout(layout_inputs(samples), tpv, pad_multiple=pad_multiple,
                             backend=backend)
        what = f"seed {seed} trial {trial}"
        assert layout.source_ids.shape[0] % pad_multiple == 0, what
        assert layout.source_ids.shape[0] - int(layout.cu_seqlens[-1]) < pad_multiple, what
        assert_layout_equals_loop(layout, samples, tpv, what)


@pytest.mark.skipif("cpp" not in LAYOUT_BACKENDS, reason="sphinx_kernels._C is not built")
def test_cpp_equals_reference_on_a_large_random_batch(seed):
    samples = random_samples(random.Random(seed), 2000, vocab=32000)
    inputs = layout_inputs(samples)
    # int32 count tensors are accepted as well as int64.
    narrow = inputs._replace(text_lens=inputs.text_lens.int(), tile_grids=inputs.tile_grids.int())
    cpp = plan_layout(narrow, 7, length=int(inputs.text_lens.sum()) * 2 + 10**5, backend="cpp")
    reference = plan_layout(inputs, 7, length=cpp.source_ids.shape[0], backend="reference")
    for name, a, b in zip(cpp._fields, cpp, reference):
        assert torch.equal(a, b), f"seed {seed}: {name}"


@pytest.mark.parametrize("backend", LAYOUT_BACKENDS)
def test_labels_never_cross_sample_boundaries(backend, seed):
    samples = random_samples(random.Random(seed), 60)
    # Every text token an answer: the only ignored labels are at boundaries and before non-text
    # rows.
    for sample in samples:
        sample.answer = [True] * len(sample.text)
    layout = plan_layout(layout_inputs(samples), 2, pad_multiple=8, backend=backend)
    ends = layout.cu_seqlens[1:].long()
    nonempty = ends > layout.cu_seqlens[:-1].long()
    assert (layout.labels[ends[nonempty] - 1] == IGNORE_INDEX).all(), f"seed {seed}"
    labelled = (layout.labels != IGNORE_INDEX).nonzero().squeeze(1)
    assert (layout.source_ids[labelled + 1] == SOURCE_TEXT).all(), f"seed {seed}"
    assert torch.equal(layout.labels[labelled], layout.row_ids[labelled + 1]), f"seed {seed}"
    row_sample = torch.searchsorted(layout.cu_seqlens.long(), labelled, right=True)
    next_sample = torch.searchsorted(layout.cu_seqlens.long(), labelled + 1, right=True)
    assert torch.equal(row_sample, next_sample), f"seed {seed}"
    # And every text row but a sample's first is predicted by the row before it.
    text = (layout.source_ids == SOURCE_TEXT).nonzero().squeeze(1)
    first = torch.isin(text, layout.cu_seqlens.long())
    assert torch.equal(layout.labels[text[~first] - 1], layout.row_ids[text[~first]])


@pytest.mark.parametrize("backend", LAYOUT_BACKENDS)
def test_gather_rows_with_the_layout_builds_the_loop_embeddings(backend, seed):
    rng = random.Random(seed)
    samples = random_samples(rng, 25, vocab=40)
    tpv, width = 3, 6
    layout = plan_layout(layout_inputs(samples), tpv, pad_multiple=8, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(40, width, generator=gen)
    visual = torch.randn(layout.visual_rows.shape[0], width, generator=gen)
    skip, begin, end = torch.randn(3, 1, width, generator=gen)
    out = sphinx_kernels.gather_rows([table, visual, skip, begin, end], layout.source_ids,
                                     layout.row_ids)
    expected, next_visual = [], 0
    for sample in samples:
        expected.extend(table[token] for token in sample.text[:sample.text_before_images])
        for image in sample.images:
            expected.append(begin[0])
            for skipped in [False] + list(image.skipped):
                if skipped:
                    expected.append(skip[0])
                else:
                    expected.extend(visual[next_visual:next_visual + tpv])
                    next_visual += tpv
            expected.append(end[0])
        expected.extend(table[token] for token in sample.text[sample.text_before_images:])
    expected.extend([torch.zeros(width)] * (out.shape[0] - len(expected)))
    assert torch.equal(out, torch.stack(expected)), f"seed {seed}"
    # A projection writing its rows to visual_rows of a zero sequence builds the same visual rows.
    packed = torch.zeros_like(out)
    packed[layout.visual_rows] = visual
    is_visual = layout.source_ids == SOURCE_VISUAL
    assert torch.equal(packed[is_visual], out[is_visual]), f"seed {seed}"


@pytest.mark.parametrize("backend", LAYOUT_BACKENDS)
def test_fixed_length_padding(backend):
    samples = [SampleSpec([1, 2, 3], [True] * 3, [ImageSpec(2, 2, [True, False, True, False])])]
    layout = plan_layout(layout_inputs(samples), 4, length=32, backend=backend)
    used = 3 + 2 + 2 + 3 * 4
    assert int(layout.cu_seqlens[-1]) == used and layout.source_ids.shape[0] == 32
    assert (layout.source_ids[used:] == SOURCE_PADDING).all()
    assert (layout.labels[used:] == IGNORE_INDEX).all() and (layout.position_ids[used:] == 0).all()
    exact = plan_layout(layout_inputs(samples), 4, length=used, backend=backend)
    assert exact.source_ids.shape[0] == used
    with pytest.raises(ValueError, match=f"need {used} packed rows, more than length = {used - 1}"):
        plan_layout(layout_inputs(samples), 4, length=used - 1, backend=backend)


def _inputs():
    return layout_inputs([SampleSpec([4, 5], [False, True], [ImageSpec(1, 2)]), SampleSpec([6])])


BAD_LAYOUTS = [
    (lambda i: (tuple(i), 2, {}), TypeError, "inputs must be LayoutInputs"),
    (lambda i: (i._replace(text_ids=i.text_ids.float()), 2, {}), TypeError,
     "inputs.text_ids must have dtype"),
    (lambda i: (i._replace(answer_mask=i.answer_mask.long()), 2, {}), TypeError,
     "inputs.answer_mask must have dtype bool"),
    (lambda i: (i._replace(tile_grids=i.tile_grids.view(-1)), 2, {}), ValueError,
     "inputs.tile_grids must be 2-D"),
    (lambda i: (i._replace(text_lens=i.text_lens[:1]), 2, {}), ValueError,
     "inputs.images_per_sample has shape (2,) but inputs.text_lens has (1,)"),
    (lambda i: (i._replace(text_lens=torch.tensor([4, -1])), 2, {}), ValueError,
     "inputs.text_lens must be >= 0"),
    (lambda i: (i._replace(images_per_sample=torch.tensor([2, -1])), 2, {}), ValueError,
     "inputs.images_per_sample must be >= 0"),
    (lambda i: (i._replace(text_before_images=torch.tensor([0, -1])), 2, {}), ValueError,
     "inputs.text_before_images must be >= 0"),
    (lambda i: (i._replace(text_before_images=torch.tensor([3, 0])), 2, {}), ValueError,
     "inputs.text_before_images[0] = 3 exceeds inputs.text_lens[0] = 2"),
    (lambda i: (i._replace(text_before_images=torch.tensor([0])), 2, {}), ValueError,
     "inputs.text_before_images has shape"),
    (lambda i: (i._replace(text_before_images=torch.tensor([0.0, 1.0])), 2, {}), TypeError,
     "inputs.text_before_images must have dtype"),
    (lambda i: (i._replace(text_ids=torch.tensor([4, -5, 6])), 2, {}), ValueError,
     "inputs.text_ids must be in [0, 2^31) (row ids are int32), got -5"),
    (lambda i: (i._replace(text_ids=torch.tensor([4, 2**31, 6])), 2, {}), ValueError,
     "inputs.text_ids must be in [0, 2^31) (row ids are int32), got 2147483648"),
    (lambda i: (i._replace(text_lens=torch.tensor([2, 2])), 2, {}), ValueError,
     "inputs.text_ids has 3 tokens but inputs.text_lens sums to 4"),
    (lambda i: (i._replace(answer_mask=i.answer_mask[:2]), 2, {}), ValueError,
     "inputs.answer_mask has 2 flags but inputs.text_ids has 3 tokens"),
    (lambda i: (i._replace(images_per_sample=torch.tensor([1, 1])), 2, {}), ValueError,
     "inputs.tile_grids must be [I, 2] with I = sum(images_per_sample) = 2"),
    (lambda i: (i._replace(tile_grids=torch.tensor([[1, 0]])), 2, {}), ValueError,
     "inputs.tile_grids must hold rows, cols >= 1"),
    (lambda i: (i._replace(skipped_tiles=i.skipped_tiles[:1]), 2, {}), ValueError,
     "inputs.skipped_tiles has 1 flags but tile_grids hold 2 tiles"),
    (lambda i: (i._replace(text_ids=i.text_ids.to("meta")), 2, {}), ValueError,
     "inputs.text_ids must be on the CPU"),
    (lambda i: (i, 0, {}), ValueError, "tokens_per_view must be >= 1"),
    (lambda i: (i, 2.0, {}), TypeError, "tokens_per_view must be an int"),
    (lambda i: (i, 2, {"pad_multiple": 0}), ValueError, "pad_multiple must be >= 1"),
    (lambda i: (i, 2, {"length": 20, "pad_multiple": 8}), ValueError,
     "length must be >= 0 and a multiple of pad_multiple = 8"),
]


@pytest.mark.parametrize("make_bad,error,message", BAD_LAYOUTS)
def test_bad_layout_input_raises_naming_the_argument(make_bad, error, message):
    inputs, tpv, kwargs = make_bad(_inputs())
    with pytest.raises(error, match=re.escape(message)):
        plan_layout(inputs, tpv, **kwargs)


def _counts(text_lens, images_per_sample, tile_grids, skipped=0):
    """LayoutInputs of samples without text tokens: only the counts, which may be huge."""
    long = torch.int64
    return LayoutInputs(torch.zeros(0, dtype=long), torch.tensor(text_lens, dtype=long),
                        torch.zeros(0, dtype=torch.bool),
                        torch.tensor(images_per_sample, dtype=long),
                        torch.tensor(tile_grids, dtype=long).view(-1, 2),
                        torch.zeros(skipped, dtype=torch.bool))


OVERFLOWING = [  # (inputs, tokens_per_view, keyword arguments, the argument named)
    (_counts([0], [1], [[2**32, 2**32]]), 1, {}, "inputs.tile_grids"),
    (_counts([0, 0], [1, 1], [[2**31, 2**31]] * 2), 1, {}, "inputs.tile_grids"),
    (_counts([0], [1], [[2**16, 2**16]]), 1, {}, "inputs.tile_grids"),
    (_counts([2**62] * 4, [0] * 4, []), 1, {}, "inputs.text_lens"),
    (_counts([0] * 4, [2**62] * 4, []), 1, {}, "inputs.images_per_sample"),
    (_counts([2**31], [0], []), 1, {}, "inputs.text_lens"),
    (_counts([], [], []), 2**70, {}, "tokens_per_view"),
    (_counts([], [], []), 1, {"pad_multiple": 2**70}, "pad_multiple"),
    (_counts([], [], []), 1, {"length": 2**70}, "length"),
]


def check_overflowing_sizes():
    """Run by :func:`test_overflowing_sizes_raise_naming_the_argument` in a fresh interpreter: such
    sizes once wrapped in int64 sums (the C++ kernel then crashed the process, the reference raised
    a bare RuntimeError, a 2^32 x 2^32 grid was accepted and its tiles dropped)."""
    for backend in LAYOUT_BACKENDS:
        for inputs, tokens_per_view, kwargs, name in OVERFLOWING:
            with pytest.raises(ValueError, match=re.escape(name)):
                plan_layout(inputs, tokens_per_view, backend=backend, **kwargs)


def test_overflowing_sizes_raise_naming_the_argument():
    run_isolated("tests.kernels.test_plan_layout", "check_overflowing_sizes")


def test_sample_spec_flag_counts_are_checked():
    with pytest.raises(ValueError, match=re.escape("samples[0].answer has 1 flags for 2 text")):
        layout_inputs([SampleSpec([1, 2], [True])])
    with pytest.raises(ValueError, match=re.escape("samples[1].images[0].skipped has 3 flags")):
        layout_inputs([SampleSpec(), SampleSpec(images=[ImageSpec(2, 2, [True] * 3)])])


@pytest.mark.parametrize("backend", LAYOUT_BACKENDS)
def test_plan_layout_opcheck(backend):
    inputs = layout_inputs(random_samples(random.Random(7), 9))
    args = tuple(t.long() if t.dtype != torch.bool else t for t in inputs)
    used = plan_layout(inputs, 3).source_ids.shape[0]
    torch.library.opcheck(torch.ops.sphinx_kernels.plan_layout.default,
                          (*args, 3, used + 5, backend))
