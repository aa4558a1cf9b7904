"""Dataset files, mixtures, and the deterministic sample stream drawn from them.

A dataset is one JSON file (an array of items) or JSONL file (one item per line; blank lines are
not items) in the format of :mod:`sphinx_model.conversation`. Its image paths are relative to its
``root``: by default the file's own folder. A mixture is a YAML file listing datasets::

    datasets:
      - path: llava_665k.json        # relative to the YAML file's folder
        root: images/                # optional: image paths are relative to this (default: the
                                     #   dataset file's folder); relative to the YAML's folder
        ratio: 1.0                   # optional, default 1
        name: llava                  # optional, default the file's stem
      - path: sharegpt.jsonl
        ratio: 0.5

**ratio** is the number of draws from a dataset per epoch, as a multiple of its size: one epoch of
the mixture draws ``round(ratio * len(dataset))`` items from each dataset: every item
``floor(ratio)`` times plus a random ``ratio - floor(ratio)`` share of the items (a fresh share each
epoch), all shuffled together. ``ratio: 1`` is one pass, ``0.5`` half the items per epoch, ``3``
three passes; ``0`` leaves the dataset out.

The **sample stream** is the infinite sequence of epochs; sample ``s`` is draw ``s % epoch_size`` of
epoch ``s // epoch_size``, each epoch a permutation seeded by ``(seed, epoch)``. It depends on the
mixture and the seed only, never on the number of ranks or workers.

Items are kept as their raw JSON text (one bytes buffer per file, parsed when drawn), so a malformed
line is found and counted when it is drawn, never fatal, and a large dataset costs its file size in
memory, shared by forked workers. A JSON array file that does not parse is an error at load time.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "SKIP_CAUSES",
    "DatasetFile",
    "Mixture",
    "SkippedItem",
    "image_size",
    "load_dataset",
    "load_mixture",
]

# Why a drawn item is not trained on (the counters the trainer reports), in a fixed order.
SKIP_CAUSES = (
    "malformed_json",         # the line is not valid JSON
    "invalid_conversation",   # wrong types, unknown or out-of-order roles, empty turns, no answer
    "missing_image",          # the image file does not exist
    "corrupt_image",          # the image file does not decode
    "image_over_budget",      # BOS and the image block alone fill the token budget
    "no_answer_in_budget",    # truncated to the budget, no answer token is left
)


class SkippedItem(Exception):
    """A drawn item that is skipped: ``cause`` (one of SKIP_CAUSES) and a message saying where and
    why."""

    def __init__(self, cause: str, message: str):
        assert cause in SKIP_CAUSES, cause
        super().__init__(message)
        self.cause = cause


@dataclass
class DatasetFile:
    """The items of one dataset file, as raw JSON text.

    Attributes:
        name: the dataset's name (for reports).
        path: the file.
        root: the folder image paths are relative to.
        blob: every item's JSON text, concatenated.
        offsets: int64 ``[n + 1]``: item ``i`` is ``blob[offsets[i]:offsets[i + 1]]``.
        lines: int64 ``[n]``: the 1-based line of each item in a JSONL file (0 in a JSON array).
    """

    name: str
    path: Path
    root: Path
    blob: bytes
    offsets: np.ndarray
    lines: np.ndarray

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    def location(self, index: int) -> str:
        """Where item ``index`` is written, for messages: ``file.jsonl:12`` or ``file.json[3]``."""
        line = int(self.lines[index])
        return f"{self.path}:{line}" if line else f"{self.path}[{index}]"

    def item(self, index: int):
        """Item ``index`` parsed; ``SkippedItem('malformed_json')`` if it does not parse."""
        raw = self.blob[self.offsets[index]:self.offsets[index + 1]]
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SkippedItem("malformed_json", f"{self.location(index)}: not valid JSON ({exc})"
                              ) from None

    def image_path(self, path: str) -> Path:
        """An item's image path resolved against the root (absolute paths are kept)."""
        return self.root / path


def load_dataset(path: str | os.PathLike, root: str | os.PathLike | None = None,
                 name: str | None = None) -> DatasetFile:
    """One JSON / JSONL dataset file (see the module docstring). ``root``: where image paths start
    (default: the file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist")
    data = path.read_bytes()
    pieces, lines = [], []
    if path.suffix == ".jsonl":
        for number, line in enumerate(data.split(b"\n"), start=1):
            if line.strip():
                pieces.append(line)
                lines.append(number)
    elif path.suffix == ".json":
        try:
            items = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"dataset file {str(path)!r} is not valid JSON ({exc}); a file with "
                             "bad lines to skip must be JSONL") from None
        if not isinstance(items, list):
            raise ValueError(f"dataset file {str(path)!r} must hold a JSON array of items, got "
                             f"{type(items).__name__}")
        pieces = [json.dumps(item, ensure_ascii=False).encode() for item in items]
        lines = [0] * len(pieces)
    else:
        raise ValueError(f"dataset file {str(path)!r}: expected a .json or .jsonl file")
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in pieces], out=offsets[1:])
    return DatasetFile(name or path.stem, path, Path(root) if root is not None else path.parent,
                       b"".join(pieces), offsets, np.asarray(lines, dtype=np.int64))


class Mixture:
    """Datasets with their ratios, and the sample stream over them (see the module docstring)."""

    def __init__(self, datasets: list[DatasetFile], ratios: list[float]):
        if len(datasets) != len(ratios) or not datasets:
            raise ValueError("a mixture needs one ratio per dataset and at least one dataset")
        for dataset, ratio in zip(datasets, ratios):
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio < 0 \
                    or not math.isfinite(ratio):
                raise ValueError(f"dataset {dataset.name!r}: ratio must be a number >= 0, got "
                                 f"{ratio!r}")
        self.datasets = datasets
        self.ratios = [float(r) for r in ratios]
        self.draws = [round(r * len(d)) for d, r in zip(datasets, self.ratios)]
        self.epoch_size = sum(self.draws)
        if self.epoch_size == 0:
            raise ValueError("the mixture draws no items: its datasets are empty or their ratios 0")
        sizes = [len(d) for d in datasets]
        self._first_item = np.cumsum([0] + sizes)  # global item id = dataset's first + index
        self._epoch: tuple[tuple[int, int], np.ndarray] | None = None  # the last epoch's order

    def __repr__(self) -> str:
        parts = ", ".join(f"{d.name}: {len(d)} items x {r:g}" for d, r in zip(self.datasets,
                                                                              self.ratios))
        return f"Mixture({parts}; {self.epoch_size} draws per epoch)"

    def epoch_order(self, epoch: int, seed: int) -> np.ndarray:
        """The global item ids drawn in ``epoch``, in stream order (int64 ``[epoch_size]``)."""
        key = (epoch, seed)
        if self._epoch is None or self._epoch[0] != key:
            draws = []
            for k, (size, count) in enumerate(zip(np.diff(self._first_item), self.draws)):
                full, extra = divmod(count, size) if size else (0, 0)
                ids = np.tile(np.arange(size, dtype=np.int64), full)
                share = np.random.default_rng([seed, epoch, k]).permutation(size)[:extra]
                draws.append(np.concatenate([ids, np.sort(share)]) + self._first_item[k])
            order = np.random.default_rng([seed, epoch]).permutation(np.concatenate(draws))
            self._epoch = (key, order)
        return self._epoch[1]

    def lookup(self, sample: int, seed: int) -> tuple[int, int]:
        """``(dataset, item)`` of stream sample ``sample`` (>= 0)."""
        epoch, position = divmod(sample, self.epoch_size)
        item = int(self.epoch_order(epoch, seed)[position])
        dataset = int(np.searchsorted(self._first_item, item, side="right")) - 1
        return dataset, item - int(self._first_item[dataset])


def load_mixture(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Mixture:
    """A YAML mixture file, or one JSON / JSONL dataset file (ratio 1; ``root`` overrides where its
    image paths start). Malformed mixture files raise ``ValueError`` naming the entry and key."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        return Mixture([load_dataset(path, root)], [1.0])
    if root is not None:
        raise ValueError("root applies to a single dataset file; a mixture names its own roots")
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"mixture file {str(path)!r} does not exist")
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    entries = spec.get("datasets") if isinstance(spec, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"mixture file {str(path)!r} must hold 'datasets:', a non-empty list")
    if set(spec) != {"datasets"}:
        raise ValueError(f"mixture file {str(path)!r}: unknown key(s) "
                         f"{', '.join(sorted(set(spec) - {'datasets'}))}; only 'datasets' is read")
    datasets, ratios = [], []
    for k, entry in enumerate(entries):
        where = f"{path}: datasets[{k}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise TypeError(f"{where} must be a mapping with a 'path' string, got {entry!r:.80}")
        unknown = sorted(set(entry) - {"path", "root", "ratio", "name"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; keys: path, root, "
                             "ratio, name")
        for key in ("root", "name"):
            if key in entry and not isinstance(entry[key], str):
                raise ValueError(f"{where}.{key} must be a string, got {entry[key]!r}")
        item_root = path.parent / entry["root"] if "root" in entry else None
        datasets.append(load_dataset(path.parent / entry["path"], item_root, entry.get("name")))
        ratios.append(entry.get("ratio", 1.0))
    return Mixture(datasets, ratios)


# EXIF orientations that turn the stored image by 90 degrees (width and height swap when upright).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image as it is displayed (EXIF orientation applied), from its
    header only (no pixels are decoded). ``SkippedItem`` when it is missing or not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except FileNotFoundError:
        raise SkippedItem("missing_image", f"image {str(path)!r} does not exist") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError,
            ValueError) as exc:
        raise SkippedItem("corrupt_image", f"image {str(path)!r} does not open: {exc}") from None
    if width < 1 or height < 1:
        raise SkippedItem("corrupt_image", f"image {str(path)!r} has size {width}x{height}")
    return (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)
