"""Dataset files and YAML mixtures: ratios per epoch, roots, errors; image sizes from headers."""
import json
from collections import Counter

import pytest
from PIL import Image

from sphinx_model.datasets import SkippedItem, image_size, load_dataset, load_mixture

from .helpers import dialogue, make_image, write_jsonl


def items(count, tag):
    return [dialogue((f"{tag} {k}?", "ok"), image=f"{tag}{k}.png") for k in range(count)]


@pytest.fixture
def mixture_file(tmp_path):
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "a.jsonl", items(3, "a"))
    (tmp_path / "sub" / "b.json").write_text(json.dumps(items(4, "b")))
    write_jsonl(tmp_path / "c.jsonl", items(2, "c"))
    path = tmp_path / "mix.yaml"
    path.write_text("datasets:\n"
                    "  - {path: a.jsonl, ratio: 2}\n"
                    "  - {path: sub/b.json, ratio: 0.5, root: pics, name: bee}\n"
                    "  - {path: c.jsonl, ratio: 0}\n")
    return path


def test_ratio_is_draws_per_epoch_as_a_multiple_of_the_size(mixture_file):
    mix = load_mixture(mixture_file)
    assert mix.draws == [6, 2, 0] and mix.epoch_size == 8
    halves = set()
    for epoch in range(6):
        drawn = Counter(mix.lookup(s, seed=3) for s in range(8 * epoch, 8 * epoch + 8))
        assert {(0, i): 2 for i in range(3)}.items() <= drawn.items()  # each of a twice
        bees = sorted(i for (d, i) in drawn if d == 1)
        assert len(bees) == 2 and all(drawn[(1, i)] == 1 for i in bees)  # half of b, no repeat
        assert not any(d == 2 for d, _ in drawn)  # ratio 0: left out
        halves.add(tuple(bees))
    assert len(halves) > 1  # a fresh half each epoch


def test_roots_names_and_locations(mixture_file, tmp_path):
    a, b, _ = load_mixture(mixture_file).datasets
    assert (a.name, b.name) == ("a", "bee")
    assert a.image_path("a0.png") == tmp_path / "a0.png"           # default: the file's folder
    assert b.image_path("b1.png") == tmp_path / "pics" / "b1.png"   # relative to the YAML
    assert a.location(1) == f"{tmp_path / 'a.jsonl'}:2" and b.location(3).endswith("b.json[3]")
    assert b.item(2)["image"] == "b2.png"
    single = load_mixture(tmp_path / "a.jsonl", root=tmp_path / "elsewhere")
    assert single.datasets[0].image_path("x.png") == tmp_path / "elsewhere" / "x.png"


def test_jsonl_blank_lines_are_not_items_and_bad_lines_are_skipped_when_drawn(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(dialogue(("a", "b"))) + "\n\n  \n{oops\n" +
                    json.dumps(dialogue(("c", "d"))) + "\n")
    data = load_dataset(path)
    assert len(data) == 3 and data.lines.tolist() == [1, 4, 5]
    with pytest.raises(SkippedItem, match=r"d.jsonl:4: not valid JSON") as info:
        data.item(1)
    assert info.value.cause == "malformed_json"


@pytest.mark.parametrize("text, error, message", [
    ("datasets: []\n", ValueError, "non-empty list"),
    ("other: 1\n", ValueError, "must hold 'datasets:'"),
    ("datasets:\n  - {path: a.jsonl}\nextra: 1\n", ValueError, "unknown key.*extra"),
    ("datasets:\n  - {path: a.jsonl, weight: 2}\n", ValueError,
     r"datasets\[0\]: unknown key.*weight"),
    ("datasets:\n  - {path: a.jsonl, ratio: -1}\n", ValueError, "ratio must be a number >= 0"),
    ("datasets:\n  - {path: a.jsonl, ratio: lots}\n", ValueError, "ratio must be a number"),
    ("datasets:\n  - {path: a.jsonl, ratio: 0}\n", ValueError, "draws no items"),
    ("datasets:\n  - a.jsonl\n", TypeError, "mapping with a 'path'"),
    ("datasets:\n  - {path: nope.jsonl}\n", FileNotFoundError, "nope.jsonl"),
])
def test_malformed_mixtures_name_the_problem(tmp_path, text, error, message):
    write_jsonl(tmp_path / "a.jsonl", items(2, "a"))
    (tmp_path / "m.yaml").write_text(text)
    with pytest.raises(error, match=message):
        load_mixture(tmp_path / "m.yaml")


def test_bad_dataset_files(tmp_path):
    (tmp_path / "x.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON.*must be JSONL"):
        load_dataset(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("{}")
    with pytest.raises(ValueError, match="JSON array"):
        load_dataset(tmp_path / "y.json")
    (tmp_path / "z.csv").write_text("")
    with pytest.raises(ValueError, match=".json or .jsonl"):
        load_dataset(tmp_path / "z.csv")


def test_image_size_reads_the_header_with_exif_orientation(tmp_path):
    make_image(tmp_path / "plain.png", 30, 10)
    assert image_size(tmp_path / "plain.png") == (30, 10)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned a quarter: 10 wide, 30 high
    Image.open(tmp_path / "plain.png").save(tmp_path / "turned.jpg", exif=exif.tobytes())
    assert image_size(tmp_path / "turned.jpg") == (10, 30)
    with pytest.raises(SkippedItem, match="does not exist") as info:
        image_size(tmp_path / "none.png")
    assert info.value.cause == "missing_image"
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(SkippedItem, match="does not open") as info:
        image_size(tmp_path / "bad.png")
    assert info.value.cause == "corrupt_image"
