"""The step pipeline: packing within the budget, no sample lost or repeated at any world size, exact
resume, deterministic order, answer-only labels, image blocks after BOS, DataLoader workers."""
import dataclasses

import pytest
import torch

import sphinx_model as sm
from sphinx_kernels import (
    IGNORE_INDEX,
    SOURCE_IMAGE_BEGIN,
    SOURCE_IMAGE_END,
    SOURCE_PADDING,
    SOURCE_TEXT,
)
from sphinx_model.conversation import ChatTemplate
from sphinx_model.data import DataConfig, DataPosition, SphinxData, StepStats
from sphinx_model.datasets import load_mixture
from sphinx_model.demo import mistral_tokenizer_path

from .helpers import CharTokenizer, dialogue, make_image, write_jsonl

VISION = sm.preset("tiny").vision          # 2x2 tiles, 17 rows per view
TPV = VISION.tokens_per_view
SHORT = ChatTemplate(system="Chat.")        # keeps character-token samples short
# Image sizes: square (no tile skipped), wide (bottom row skipped), tall (right column skipped).
SIZES = {"square.png": (24, 24), "wide.png": (40, 12), "tall.jpg": (10, 36), "big.png": (60, 45)}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A JSONL dataset of 30 items: text-only dialogues of varied lengths and image dialogues."""
    folder = tmp_path_factory.mktemp("mixed")
    for k, (name, (w, h)) in enumerate(SIZES.items()):
        make_image(folder / name, w, h, seed=k)
    items = []
    for k in range(30):
        if k % 3 == 0:
            items.append(dialogue((f"Look {k}?", "It is " + "ab" * (k % 7)),
                                  image=list(SIZES)[k % len(SIZES)]))
        else:
            pairs = [(f"Q{k}{'?' * (k % 5)}", "A" + "z" * (3 * k % 40))]
            pairs += [("More?", "Yes" + "!" * k)] * (k % 2)
            items.append(dialogue(*pairs))
    return write_jsonl(folder / "mixed.jsonl", items)


def make_data(path, rank=0, world_size=1, position=None, tokenizer=None, **config):
    config = DataConfig(**{"budget": 320, "global_batch": 8, "num_workers": 0, **config})
    return SphinxData(load_mixture(path), tokenizer or CharTokenizer(), VISION, config,
                      template=SHORT, rank=rank, world_size=world_size,
                      position=position or DataPosition())


def same_batch(a, b) -> bool:
    """The same counts and bit-equal tensors."""
    def counts(m):
        return m.max_seqlen, m.num_samples, m.num_tiles, m.num_skipped_tiles

    def tensors(m):
        return [*m.layout, m.dinov2_pixels, m.convnext_pixels]

    return counts(a) == counts(b) and all(x.shape == y.shape and torch.equal(x, y)
                                          for x, y in zip(tensors(a), tensors(b)))


def steps(data, count, start=0):
    return [data.step_batch(s) for s in range(start, start + count)]


@pytest.fixture(scope="module")
def one_rank(mixed):
    return steps(make_data(mixed), 5)


def test_micro_batches_within_budget_and_every_sample_once(one_rank):
    for k, batch in enumerate(one_rank):
        drawn = set(range(8 * k, 8 * k + 8))
        ids = [i for mb in batch.sample_ids for i in mb]
        assert sorted(ids) == sorted(drawn)  # nothing skipped in this dataset, nothing repeated
        for mb, mb_ids in zip(batch.micro_batches, batch.sample_ids):
            assert mb.layout.position_ids.shape[0] <= 320 and mb.num_samples == len(mb_ids)
        assert batch.position == DataPosition(k + 1, 8 * k + 8)
        assert batch.stats.samples == 8 and batch.stats.rows <= 320 * len(batch.micro_batches)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_the_one_rank_micro_batches(mixed, one_rank, world_size):
    for k, single in enumerate(one_rank[:3]):
        shares = [make_data(mixed, rank=r, world_size=world_size).step_batch(k)
                  for r in range(world_size)]
        counts = {len(s.micro_batches) for s in shares}
        assert counts == {max(1, -(-len(single.micro_batches) // world_size))}
        real = [(mb, ids) for s in shares for mb, ids in zip(s.micro_batches, s.sample_ids) if ids]
        assert sorted(i for _, ids in real for i in ids) == \
            sorted(i for ids in single.sample_ids for i in ids)  # no sample repeated or lost
        assert len(real) == len(single.micro_batches)
        for mb, _ in real:  # the very same bins, dealt out
            assert any(same_batch(mb, other) for other in single.micro_batches)
        total = sum((s.stats for s in shares[1:]), shares[0].stats)
        empty = sum(not ids for s in shares for ids in s.sample_ids)
        assert total == dataclasses.replace(single.stats, rows=single.stats.rows + empty)
        assert all(s.position == single.position for s in shares)


def test_resume_reproduces_the_uninterrupted_run_at_any_world_size(mixed, one_rank):
    position = one_rank[1].position  # after step 1
    resumed = steps(make_data(mixed, position=position), 3, start=2)
    for a, b in zip(resumed, one_rank[2:]):
        assert a.step == b.step and a.sample_ids == b.sample_ids and a.stats == b.stats
        assert all(same_batch(x, y) for x, y in zip(a.micro_batches, b.micro_batches))
    # Two ranks trained steps 0-1; one rank resumes, or the other way round: the same samples.
    as_two = [make_data(mixed, rank=r, world_size=2, position=position).step_batch(2)
              for r in range(2)]
    assert sorted(i for s in as_two for ids in s.sample_ids for i in ids) == \
        sorted(i for ids in one_rank[2].sample_ids for i in ids)


def test_a_changed_global_batch_continues_from_the_same_sample(mixed, one_rank):
    resumed = make_data(mixed, position=one_rank[1].position, global_batch=5)
    ids = [sorted(i for ids in resumed.step_batch(s).sample_ids for i in ids) for s in (2, 3)]
    assert ids == [list(range(16, 21)), list(range(21, 26))]


def test_order_is_deterministic_given_the_seed(mixed, one_rank):
    again = steps(make_data(mixed), 2)
    assert [b.sample_ids for b in again] == [b.sample_ids for b in one_rank[:2]]
    stream = make_data(mixed).mixture
    first = [stream.lookup(s, 0) for s in range(30)]
    assert first == [stream.lookup(s, 0) for s in range(30)]
    assert sorted(first) == [(0, i) for i in range(30)]  # one epoch: each item once
    assert first != [stream.lookup(s, 1) for s in range(30)]  # another seed, another order
    assert first != [stream.lookup(s, 0) for s in range(30, 60)]  # another epoch too


def test_loader_workers_give_the_in_process_batches(mixed, one_rank):
    data = make_data(mixed, position=one_rank[0].position, num_workers=2, prefetch_factor=1)
    got = list(data.loader(steps=4))
    assert [b.step for b in got] == [1, 2, 3]
    for a, b in zip(got, one_rank[1:4]):
        assert a.sample_ids == b.sample_ids and a.stats == b.stats
        assert all(same_batch(x, y) for x, y in zip(a.micro_batches, b.micro_batches))


def test_empty_micro_batches_keep_every_rank_in_step(mixed):
    shares = [make_data(mixed, rank=r, world_size=8, global_batch=3).step_batch(0)
              for r in range(8)]
    assert {len(s.micro_batches) for s in shares} == {1}
    empty = [s.micro_batches[0] for s in shares if not s.sample_ids[0]]
    assert empty  # 3 samples cannot feed 8 ranks
    for mb in empty:
        assert mb.num_samples == 0 and mb.num_views == 0 and mb.num_trained_tokens == 0
        assert mb.layout.cu_seqlens.tolist() == [0]
        assert (mb.layout.source_ids == SOURCE_PADDING).all() and mb.layout.source_ids.numel() == 1
        assert mb.dinov2_pixels.shape == (0, 3, VISION.dinov2_image_size,
                                          VISION.dinov2_image_size)


def test_padding_options_and_prefix_lengths(mixed):
    padded = make_data(mixed, pad_to_budget=True).step_batch(0)
    assert {mb.layout.position_ids.shape[0] for mb in padded.micro_batches} == {320}
    multiple = make_data(mixed, pad_multiple=16).step_batch(0)
    assert all(mb.layout.position_ids.shape[0] % 16 == 0 for mb in multiple.micro_batches)
    data = make_data(mixed)
    data.prefix_lm = True
    for mb in data.step_batch(0).micro_batches:
        cu, source = mb.layout.cu_seqlens.tolist(), mb.layout.source_ids
        for b, prefix in enumerate(mb.prefix_lens.tolist()):
            block = source[cu[b]:cu[b] + prefix]  # BOS, then whole image blocks only
            assert block[0] == SOURCE_TEXT and (prefix == 1 or block[-1] == SOURCE_IMAGE_END)
            assert source[cu[b] + prefix] == SOURCE_TEXT


def test_stats_count_skip_tokens_and_padding(one_rank):
    total = sum((b.stats for b in one_rank[1:]), one_rank[0].stats)
    views = sum(mb.num_views for b in one_rank for mb in b.micro_batches)
    skipped = sum(mb.num_skipped_tiles for b in one_rank for mb in b.micro_batches)
    assert skipped > 0 and total.visual_rows == views * TPV
    assert total.skip_rows == skipped and total.skip_saved_rows == skipped * (TPV - 1)
    assert total.trained_tokens == sum(mb.num_trained_tokens for b in one_rank
                                       for mb in b.micro_batches)
    assert total.tokens == total.rows  # pad_multiple 1: no padding rows
    assert total.baseline_rows > total.tokens and total.padding_saved_share == 1.0
    assert 0 < total.skip_saved_share < 1
    assert StepStats.from_tensor(total.to_tensor()) == total


@pytest.mark.skipif(mistral_tokenizer_path() is None, reason="mistral-common is not installed")
def test_labels_only_on_answers_and_images_right_after_bos(mixed):
    tok = sm.load_tokenizer(mistral_tokenizer_path())
    data = make_data(mixed, tokenizer=tok, budget=400)
    items = [data.mixture.datasets[0].item(i) for i in range(30)]
    for batch in steps(data, 2):
        for mb, ids in zip(batch.micro_batches, batch.sample_ids):
            layout = mb.layout
            cu = layout.cu_seqlens.tolist()
            labelled = layout.labels != IGNORE_INDEX
            # Every label is the next row's token, and that row is text of the same sample.
            t = torch.nonzero(labelled).flatten()
            assert (layout.source_ids[t + 1] == SOURCE_TEXT).all()
            assert torch.equal(layout.labels[t], layout.row_ids[t + 1].long())
            for b, sample in enumerate(ids):
                item = items[data.mixture.lookup(sample, 0)[1]]
                rows = slice(cu[b], cu[b + 1])
                assert layout.source_ids[cu[b]] == SOURCE_TEXT and \
                    layout.row_ids[cu[b]] == tok.bos_id
                if "image" in item:  # the block right after BOS
                    assert layout.source_ids[cu[b] + 1] == SOURCE_IMAGE_BEGIN
                answers = [turn["value"].strip() for turn in item["conversations"][1::2]]
                trained = tok.decode(layout.labels[rows][labelled[rows]].tolist())
                assert trained == "\n### ".join(answers) + "\n###"
                assert not labelled[cu[b + 1] - 1]  # a sample's last row predicts nothing


def test_data_config_is_validated():
    with pytest.raises(ValueError, match="data.budget must be >= 1"):
        DataConfig(budget=0)
    with pytest.raises(ValueError, match="multiple of data.pad_multiple"):
        DataConfig(budget=100, pad_multiple=16, pad_to_budget=True)
    with pytest.raises(ValueError, match="rank must be in"):
        SphinxData(None, CharTokenizer(), VISION, DataConfig(), rank=2, world_size=2)
    assert dataclasses.asdict(DataPosition(3, 24)) == DataPosition(3, 24).to_dict()
    assert DataPosition.from_dict({"step": 3, "sample": 24}) == DataPosition(3, 24)


@pytest.mark.gpu
def test_pinned_batches_move_to_the_gpu(mixed):
    data = make_data(mixed, num_workers=1, prefetch_factor=1)
    batch = next(iter(data.loader(steps=1, pin_memory=True)))
    for mb in batch.micro_batches:
        assert mb.layout.labels.is_pinned() and mb.dinov2_pixels.is_pinned()
        moved = mb.to("cuda", non_blocking=True)
        assert moved.layout.labels.is_cuda and moved.convnext_pixels.dtype == torch.uint8
        assert torch.equal(moved.layout.labels.cpu(), mb.layout.labels)


def test_pack_samples_packs_a_generation_prompt(mixed):
    from PIL import Image

    from sphinx_model.tiling import tile_image

    tok = CharTokenizer()
    ids = sm.encode_prompt(tok, [sm.Turn("user", "What is it?")], SHORT)
    tiled = tile_image(Image.open(mixed.parent / "wide.png"), VISION)
    batch = sm.pack_samples([(ids, [False] * len(ids), [tiled])], VISION, prefix_lm=True)
    layout = batch.layout
    block = 2 + 3 * TPV + 2  # markers, global view, two kept tiles, two skip rows
    assert batch.num_samples == 1 and batch.num_tokens == len(ids) + block
    assert layout.source_ids[1] == SOURCE_IMAGE_BEGIN and layout.source_ids[block] == \
        SOURCE_IMAGE_END
    assert layout.row_ids[layout.source_ids == SOURCE_TEXT].tolist() == ids
    assert (layout.labels == IGNORE_INDEX).all() and batch.prefix_lens.tolist() == [1 + block]
    assert torch.equal(batch.dinov2_pixels, tiled.dinov2_pixels)
