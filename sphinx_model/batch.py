"""The packed micro-batch: what the data pipeline hands the model (the contract between the two).

One micro-batch is ``B`` samples packed back to back in ``T`` rows with no padding between them
(rows past ``cu_seqlens[-1]`` are padding). Its layout is ``sphinx_kernels.plan_layout``'s
(:class:`sphinx_kernels.PackedLayout`): per sample, for each of its images a begin-image marker, the
global view's visual rows, its tiles in raster order (each either its visual rows or one skip row),
an end-image marker, all right after the sample's BOS token; then the rest of its text.

The pixels are those of the **kept** views only (global views and tiles holding image pixels), in
the order of ``layout.view_starts`` (sample, image, view), as uint8 so a batch stays small in pinned
memory and moves to the GPU cheaply; the vision tower normalises them on the device.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from sphinx_kernels import IGNORE_INDEX, PackedLayout

__all__ = ["PackedBatch"]


@dataclass
class PackedBatch:
    """One packed micro-batch of ``B`` samples, ``T`` rows, ``V`` kept views.

    Attributes:
        layout: the packed layout (``cu_seqlens`` int32 ``[B+1]``, ``position_ids``, ``source_ids``,
            ``row_ids`` int32 ``[T]``, ``labels`` int64 ``[T]``, ``visual_rows``, ``view_starts``).
        dinov2_pixels: uint8 ``[V, 3, S1, S1]`` (``S1 = vision.dinov2_image_size``), RGB.
        convnext_pixels: uint8 ``[V, 3, S2, S2]`` (``S2 = vision.convnext_image_size``), RGB.
        max_seqlen: the longest sample's rows (a host int, so no op needs a device sync).
        prefix_lens: int32 ``[B]``: rows of each sample's image block (BOS included) when the model
            attends bidirectionally over it (``llm.prefix_lm``), else None.
        num_samples: ``B``; ``num_tiles`` / ``num_skipped_tiles``: sub-image tiles in the batch and
            how many of them are skip tokens (for the trainer's statistics).
    """

    layout: PackedLayout
    dinov2_pixels: torch.Tensor
    convnext_pixels: torch.Tensor
    max_seqlen: int
    prefix_lens: torch.Tensor | None = None
    num_samples: int = 0
    num_tiles: int = 0
    num_skipped_tiles: int = 0

    @property
    def num_tokens(self) -> int:
        """Rows that belong to samples (``cu_seqlens[-1]``), padding excluded."""
        return int(self.layout.cu_seqlens[-1])

    @property
    def num_trained_tokens(self) -> int:
        """Rows with a label (the loss's token count for this micro-batch)."""
        return int((self.layout.labels != IGNORE_INDEX).sum())

    @property
    def num_views(self) -> int:
        return self.dinov2_pixels.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        """The batch with every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(self, layout=PackedLayout(*(move(t) for t in self.layout)),
                       dinov2_pixels=move(self.dinov2_pixels),
                       convnext_pixels=move(self.convnext_pixels),
                       prefix_lens=move(self.prefix_lens))

    def pin_memory(self) -> "PackedBatch":
        """Called by ``torch.utils.data.DataLoader(pin_memory=True)``."""
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return replace(self, layout=PackedLayout(*(pin(t) for t in self.layout)),
                       dinov2_pixels=pin(self.dinov2_pixels),
                       convnext_pixels=pin(self.convnext_pixels), prefix_lens=pin(self.prefix_lens))

    def __repr__(self) -> str:
        sizes = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                          if isinstance(getattr(self, f.name), int))
        return (f"PackedBatch(rows={self.layout.position_ids.shape[0]}, views={self.num_views}, "
                f"{sizes})")
