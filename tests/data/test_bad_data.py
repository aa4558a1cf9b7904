"""Bad data is skipped and counted by cause, never a crash mid-epoch; long samples are truncated and
counted."""
import logging

import pytest

import sphinx_model as sm
from sphinx_kernels import IGNORE_INDEX
from sphinx_model.conversation import ChatTemplate
from sphinx_model.data import DataConfig, SphinxData
from sphinx_model.datasets import SKIP_CAUSES, load_mixture

from .helpers import CharTokenizer, dialogue, make_image, write_jsonl

VISION = sm.preset("tiny").vision
SHORT = ChatTemplate(system="Chat.")


def make_data(path, **config):
    config = DataConfig(**{"budget": 200, "global_batch": 4, "num_workers": 0, **config})
    return SphinxData(load_mixture(path), CharTokenizer(), VISION, config, template=SHORT)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """12 items: 6 good (2 with images), a malformed line, a bad role, a missing image, an image
    that is not one (found from its header), a truncated JPEG (found only when decoded)."""
    folder = tmp_path_factory.mktemp("bad")
    make_image(folder / "ok.png", 30, 20)
    make_image(folder / "full.jpg", 64, 48)
    full = (folder / "full.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(full[:-100])  # the header is intact
    (folder / "garbage.png").write_bytes(b"\x89PNG not really an image")
    items = [dialogue(("Hi?", "Hello.")), dialogue(("Pic?", "A pattern."), image="ok.png"),
             '{"conversations": [{"from": "human", "value": "unterminated',
             dialogue(("Q?", "A."))] + [
             {"conversations": [{"from": "robot", "value": "beep"}, {"from": "gpt", "value": "x"}]},
             dialogue(("Where?", "Nowhere."), image="missing.png"),
             dialogue(("Noise?", "Yes."), image="garbage.png"),
             dialogue(("Cut?", "Yes."), image="truncated.jpg"),
             dialogue(("Two?", "Two.")), dialogue(("Pic again?", "Same."), image="ok.png"),
             dialogue(("Three?", "Three.")), dialogue(("Four?", "Four."))]
    return write_jsonl(folder / "bad.jsonl", items)


def test_loader_trains_through_bad_items_and_counts_them_by_cause(bad, caplog):
    data = make_data(bad, num_workers=2, prefetch_factor=1)
    epochs, per_step = 2, 4  # 12 items a epoch: 6 steps
    with caplog.at_level(logging.WARNING, logger="sphinx_model.data"):
        batches = list(data.loader(steps=epochs * 12 // per_step))
    assert [b.step for b in batches] == list(range(6))
    total = sum((b.stats for b in batches[1:]), batches[0].stats)
    assert total.skipped == {"malformed_json": 2, "invalid_conversation": 2, "missing_image": 2,
                             "corrupt_image": 4, "image_over_budget": 0, "no_answer_in_budget": 0}
    assert total.samples == 2 * 7  # every good item, every epoch
    assert sum(len(ids) for b in batches for ids in b.sample_ids) == total.samples


def test_skips_are_logged_with_where_and_why(bad, caplog):
    data = make_data(bad)
    with caplog.at_level(logging.WARNING, logger="sphinx_model.data"):
        for step in range(3):
            data.step_batch(step)
    text = caplog.text
    assert "bad.jsonl:3: not valid JSON" in text
    assert "bad.jsonl:5: conversations[0].from = 'robot'" in text
    assert "missing.png' does not exist" in text
    assert "garbage.png' does not open" in text
    assert "truncated.jpg' does not decode" in text


def test_long_samples_are_truncated_and_counted(tmp_path):
    make_image(tmp_path / "sq.png", 32, 32)  # 2x2 tiles kept: 2 + 5 * 17 = 87 image rows
    items = [dialogue(("Long?", "L" * 300)),                       # cut inside the answer
             dialogue(("Q" * 300, "Answer.")),                       # the answer is cut off
             dialogue(("Pic?", "P" * 200), image="sq.png")]
    path = write_jsonl(tmp_path / "long.jsonl", items)
    batch = make_data(path, global_batch=3, budget=150).step_batch(0)
    assert batch.stats.truncated == 2 and batch.stats.samples == 2
    assert batch.stats.skipped["no_answer_in_budget"] == 1
    for mb in batch.micro_batches:
        lengths = mb.layout.cu_seqlens.diff().tolist()
        assert lengths == [150] * mb.num_samples  # each cut to exactly the budget
        assert (mb.layout.labels != IGNORE_INDEX).any()
    over = make_data(path, global_batch=3, budget=80).step_batch(0)  # the image block needs 88
    assert over.stats.skipped["image_over_budget"] == 1


def test_skip_causes_are_the_documented_ones():
    assert SKIP_CAUSES == ("malformed_json", "invalid_conversation", "missing_image",
                           "corrupt_image", "image_over_budget", "no_answer_in_budget")
