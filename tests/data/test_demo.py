"""The demo data: built offline from installed packages, reused, with tiles to skip."""
import json
from collections import defaultdict

import pytest
from PIL import Image

import sphinx_model as sm
from sphinx_model.conversation import parse_conversation
from sphinx_model.data import DataConfig, SphinxData
from sphinx_model.datasets import image_size
from sphinx_model.demo import CROPS, PHOTOS, TEXT_DIALOGUES, build_demo, mistral_tokenizer_path
from sphinx_model.tiling import tile_geometry, tile_image

VISION = sm.preset("tiny").vision


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"))


def records(demo, name):
    lines = (demo.directory / f"{name}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_demo_is_built_with_photos_dialogues_and_a_tokenizer(demo):
    images, text = records(demo, "images"), records(demo, "text")
    assert len(images) == 5 * (len(PHOTOS) + len(CROPS)) and len(text) == len(TEXT_DIALOGUES)
    mixture = sm.load_mixture(demo.mixture)
    assert mixture.draws == [len(images), 2 * len(text)]
    tok = demo.load_tokenizer()
    if mistral_tokenizer_path() is not None:
        assert demo.tokenizer.name == "tokenizer.model" and tok.vocab_size == 32000
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    for record in images:
        assert (demo.directory / record["image"]).is_file()


def test_answers_are_consistent(demo):
    answers = defaultdict(set)  # (subject photo, question) -> answers
    first = defaultdict(set)    # image file -> questions asked first
    for record in records(demo, "images"):
        name = record["image"].split("/")[-1][:-4]
        subject = CROPS[name][0] if name in CROPS else name
        turns = parse_conversation(record).turns
        first[name].add(turns[0].text)
        for question, answer in zip(turns[::2], turns[1::2]):
            answers[subject, question.text].add(answer.text)
    assert all(len(found) == 1 for found in answers.values())
    assert all(len(questions) == 5 for questions in first.values())  # each question asked first


def test_some_demo_images_have_skipped_tiles_one_through_exif(demo):
    skipped = {}
    for path in sorted((demo.directory / "images").glob("*.jpg")):
        skipped[path.stem] = sum(tile_geometry(*image_size(path), VISION.tiles)[2])
    assert skipped["astronaut"] == 0 and skipped["cat"] == 0
    assert all(skipped[name] == 2 for name in CROPS)  # a row or a column of the 2x2 grid
    turned = demo.directory / "images" / "rocket_tall.jpg"
    stored = Image.open(turned).size
    assert stored[0] > stored[1] and image_size(turned) == stored[::-1]  # upright: tall
    tiled = tile_image(Image.open(turned), VISION)
    assert tiled.skipped == [False, True, False, True]  # the right column


def test_demo_is_reused_and_builds_without_mistral_common(demo, tmp_path):
    stamp = (demo.directory / "demo.json").stat().st_mtime_ns
    assert build_demo(demo.directory.parent) == demo
    assert (demo.directory / "demo.json").stat().st_mtime_ns == stamp
    fallback = build_demo(tmp_path, use_mistral=False)
    tok = fallback.load_tokenizer()
    assert fallback.tokenizer.name == "tokenizer.json" and tok.vocab_size <= 32000
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    text = sm.SPHINX_TEMPLATE.render(parse_conversation(records(fallback, "images")[0]).turns)
    assert tok.decode(tok.encode(text)) == text


def test_demo_data_step(demo, monkeypatch):
    monkeypatch.setenv("SPHINX_DEMO_DIR", str(demo.directory.parent))
    data = SphinxData.from_config(DataConfig(path="demo", budget=1024, global_batch=12,
                                             num_workers=0), sm.preset("tiny"))
    assert data.mixture.datasets[0].path.parent == demo.directory
    batch = data.step_batch(0)
    assert batch.stats.samples == 12 and not any(batch.stats.skipped.values())
    assert batch.stats.trained_tokens > 0 and batch.stats.visual_rows > 0
    assert batch.stats.skip_rows > 0  # crops in this seed's first step
