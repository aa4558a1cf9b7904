"""The demo data: real photographs with short dialogues about them, built offline on first use.

    demo = build_demo()          # reused when already built
    demo.mixture                 # the YAML mixture (images.jsonl once per epoch, text.jsonl twice)
    demo.load_tokenizer()        # its tokenizer

Photographs: scikit-image's sample images (shipped in its wheel), eight whole and six crops of them
at other aspect ratios (wide strips, tall strips), whose empty tiles become skip tokens; one crop is
stored sideways with an EXIF orientation tag. Each photograph has five short dialogues with
consistent answers (the same question always gets the same answer about the same subject), so the
``tiny`` preset learns them in a few hundred CPU steps; a dozen text-only dialogues are mixed in.

Tokenizer: Mixtral's SentencePiece model from the ``mistral-common`` package (vocab 32000, BOS 1,
EOS 2), copied in; without that package, a byte-level BPE trained on the demo's own text with
``tokenizers`` (BOS 1, EOS 2, a few thousand ids). Nothing is downloaded.

Where: ``$SPHINX_DEMO_DIR`` if set, else ``~/.cache/sphinx_model``; the data go into a folder
named after a hash of their content and tokenizer (``demo-<hash>``), outside any repository. A build
writes into a temporary folder and renames it, so concurrent first runs are safe.

``python -m sphinx_model.demo`` builds it and prints where.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sphinx_model.conversation import SPHINX_TEMPLATE, parse_conversation
from sphinx_model.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "CROPS",
    "PHOTOS",
    "TEXT_DIALOGUES",
    "DemoData",
    "build_demo",
    "default_demo_root",
    "mistral_tokenizer_path",
    "train_bpe_tokenizer",
]

_DEMO_FORMAT = 1  # bump when the files' layout changes (the content is hashed anyway)

# Photographs: scikit-image loader, a one-line description, whether in colour, and two facts
# (question, answer) about it. Every answer is short and the same wherever it is asked.
PHOTOS = {
    "astronaut": ("astronaut", "An astronaut in an orange spacesuit.", True,
                  [("What color is the suit?", "Orange."),
                   ("What is the person wearing?", "A spacesuit.")]),
    "cat": ("chelsea", "A tabby cat with green eyes.", True,
            [("What animal is this?", "A cat."), ("What color are its eyes?", "Green.")]),
    "coffee": ("coffee", "A red cup of coffee on a saucer.", True,
               [("What drink is this?", "Coffee."), ("What color is the cup?", "Red.")]),
    "rocket": ("rocket", "A rocket on its launch pad at night.", True,
               [("Is it day or night?", "Night."), ("What is standing in the middle?",
                                                    "A rocket.")]),
    "cameraman": ("camera", "A man filming with a camera on a tripod.", False,
                  [("What is the man holding?", "A camera."),
                   ("What is the camera standing on?", "A tripod.")]),
    "coins": ("coins", "Rows of old coins on a black background.", False,
              [("How many rows of coins are there?", "Four."),
               ("What are these objects?", "Old coins.")]),
    "galaxies": ("hubble_deep_field", "Many galaxies in deep space.", True,
                 [("Where is this?", "In deep space."),
                  ("What color is the background?", "Black.")]),
    "motorcycle": ("stereo_motorcycle", "A red motorcycle in a garage.", True,
                   [("What vehicle is this?", "A motorcycle."), ("What color is it?", "Red.")]),
}
# Crops (name: photo, (left, upper, right, lower) box, EXIF orientation it is stored with): wide
# strips skip the bottom row of tiles, tall strips the right column.
CROPS = {
    "astronaut_tall": ("astronaut", (40, 0, 290, 512), 1),
    "cat_wide": ("cat", (0, 40, 451, 240), 1),
    "coffee_wide": ("coffee", (0, 20, 600, 300), 1),
    "rocket_tall": ("rocket", (220, 0, 420, 427), 6),  # stored turned; EXIF 6 turns it upright
    "motorcycle_wide": ("motorcycle", (0, 150, 741, 480), 1),
    "cameraman_tall": ("cameraman", (60, 0, 300, 512), 1),
}
TEXT_DIALOGUES = [
    [("What is the capital of France?", "Paris.")],
    [("What is two plus three?", "Five.")],
    [("Hello!", "Hello! How can I help you?")],
    [("What color is the sky on a clear day?", "Blue.")],
    [("How many legs does a cat have?", "Four.")],
    [("Name a fruit.", "An apple."), ("What color is it?", "Red or green.")],
    [("What do bees make?", "Honey.")],
    [("What is the opposite of hot?", "Cold.")],
    [("What is the largest planet?", "Jupiter."),
     ("Is it bigger than Earth?", "Yes, much bigger.")],
    [("Thank you!", "You are welcome.")],
    [("What is frozen water called?", "Ice.")],
    [("How many days are in a week?", "Seven.")],
]
_COLOR_QUESTION = "Is this photo in color?"
_COLOR_ANSWERS = {True: "Yes.", False: "No, it is black and white."}


@dataclass(frozen=True)
class DemoData:
    """A built demo: its folder, the mixture file and the tokenizer file in it."""

    directory: Path

    @property
    def mixture(self) -> Path:
        return self.directory / "mixture.yaml"

    @property
    def tokenizer(self) -> Path:
        manifest = json.loads((self.directory / "demo.json").read_text(encoding="utf-8"))
        return self.directory / manifest["tokenizer"]

    def load_tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer)


def default_demo_root() -> Path:
    """``$SPHINX_DEMO_DIR``, else ``~/.cache/sphinx_model``."""
    root = os.environ.get("SPHINX_DEMO_DIR")
    return Path(root) if root else Path.home() / ".cache" / "sphinx_model"


def mistral_tokenizer_path() -> Path | None:
    """Mixtral's SentencePiece model inside the installed ``mistral-common``, or None."""
    try:
        import mistral_common
    except ImportError:
        return None
    folder = Path(mistral_common.__file__).parent / "data"
    found = sorted(folder.glob("tokenizer.model.v1*")) if folder.is_dir() else []
    return found[0] if found else None


def build_demo(root: str | os.PathLike | None = None, *, use_mistral: bool = True) -> DemoData:
    """Builds the demo data under ``root`` (default :func:`default_demo_root`) unless already
    there; returns it. ``use_mistral=False`` trains the fallback BPE tokenizer even when
    ``mistral-common`` is installed."""
    mistral = mistral_tokenizer_path() if use_mistral else None
    records = _records()
    spec = json.dumps([_DEMO_FORMAT, PHOTOS, CROPS, records,
                       hashlib.sha256(mistral.read_bytes()).hexdigest() if mistral else "bpe"],
                      sort_keys=True)
    digest = hashlib.sha256(spec.encode()).hexdigest()[:12]
    target = Path(root or default_demo_root()) / f"demo-{digest}"
    if (target / "demo.json").is_file():
        return DemoData(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=target.parent))
    try:
        _write_images(building / "images")
        for name in ("images", "text"):
            with open(building / f"{name}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(record, ensure_ascii=False) + "\n"
                             for record in records[name])
        (building / "mixture.yaml").write_text(
            "# The demo mixture: each photo dialogue once per epoch, each text dialogue twice.\n"
            "datasets:\n"
            "  - {path: images.jsonl, ratio: 1.0}\n"
            "  - {path: text.jsonl, ratio: 2.0}\n", encoding="utf-8")
        if mistral is not None:
            shutil.copyfile(mistral, building / "tokenizer.model")
            tokenizer = "tokenizer.model"
        else:
            _train_bpe(records, building / "tokenizer.json")
            tokenizer = "tokenizer.json"
        (building / "demo.json").write_text(json.dumps({"format": _DEMO_FORMAT,
                                                        "tokenizer": tokenizer}) + "\n")
        try:
            building.rename(target)
        except OSError:  # another process built it first
            if not (target / "demo.json").is_file():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return DemoData(target)


def _records() -> dict[str, list[dict]]:
    """The dialogues as LLaVA-format items: five per photograph and crop, each question asked first
    in one of them, and the text ones."""
    images = []
    for name, photo in [(n, n) for n in PHOTOS] + [(n, c[0]) for n, c in CROPS.items()]:
        _, description, color, facts = PHOTOS[photo]
        what, describe = ("What is in this image?", description), ("Describe the image briefly.",
                                                                  description)
        in_color = (_COLOR_QUESTION, _COLOR_ANSWERS[color])
        for turns in ([what, facts[1]], [facts[0], in_color], [in_color, describe],
                      [describe, facts[0]], [facts[1], what]):
            images.append({"image": f"images/{name}.jpg",
                           "conversations": _llava_turns(turns, image=True)})
    text = [{"conversations": _llava_turns(turns, image=False)} for turns in TEXT_DIALOGUES]
    return {"images": images, "text": text}


def _llava_turns(pairs, image: bool) -> list[dict]:
    out = []
    for k, (question, answer) in enumerate(pairs):
        prefix = "<image>\n" if image and k == 0 else ""
        out += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    return out


def _write_images(folder: Path) -> None:
    """The photographs and crops as JPEG files (quality 92)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    folder.mkdir()
    photos = {}
    for name, (loader, *_) in PHOTOS.items():
        pixels = getattr(skimage.data, loader)()
        pixels = pixels[0] if isinstance(pixels, tuple) else pixels  # a stereo pair: the left one
        photos[name] = Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")
        photos[name].save(folder / f"{name}.jpg", quality=92)
    for name, (photo, box, orientation) in CROPS.items():
        crop = photos[photo].crop(box)
        exif = Image.Exif()
        if orientation == 6:  # stored turned a quarter counter-clockwise; viewers turn it back
            crop = crop.transpose(Image.Transpose.ROTATE_90)
            exif[0x0112] = orientation
        crop.save(folder / f"{name}.jpg", quality=92, exif=exif.tobytes())


def _train_bpe(records: dict[str, list[dict]], path: Path) -> None:
    """The fallback tokenizer, trained on the demo's rendered dialogues."""
    texts = [SPHINX_TEMPLATE.render(parse_conversation(record).turns)
             for record in records["images"] + records["text"]]
    train_bpe_tokenizer(texts, path)


def train_bpe_tokenizer(texts: Iterable[str], path: Path, vocab_size: int = 2000) -> Path:
    """A byte-level BPE ``tokenizer.json`` trained offline on ``texts`` and written to ``path``;
    ids 0-2 are ``<unk>``, ``<s>`` (BOS), ``</s>`` (EOS)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = HFTokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(path))
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m sphinx_model.demo [--photo NAME]``: builds the demo data (if needed) and prints
    where it is, or the path of one photograph (``cat``, ``coffee``, ... and the crops)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sphinx_model.demo", description=main.__doc__)
    parser.add_argument("--photo", help=f"print this photograph's path: one of "
                                        f"{', '.join(sorted([*PHOTOS, *CROPS]))}")
    args = parser.parse_args(argv)
    demo = build_demo()
    if args.photo is None:
        print(f"demo data: {demo.directory}\n  mixture: {demo.mixture}\n  tokenizer: "
              f"{demo.tokenizer}")
        return
    path = demo.directory / "images" / f"{args.photo}.jpg"
    if args.photo not in PHOTOS and args.photo not in CROPS or not path.is_file():
        parser.error(f"no demo photograph {args.photo!r}; choose from "
                     f"{', '.join(sorted([*PHOTOS, *CROPS]))}")
    print(path)


if __name__ == "__main__":
    main()
