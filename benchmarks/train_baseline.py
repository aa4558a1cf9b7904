"""The padded baseline of the end-to-end training benchmark (``bench_train``): what a user of the
SPHINX reference runs, built from the libraries users already have, holding our model's weights.

Per micro-batch (fixed-size, consecutive samples, every sub-image encoded, no skip tokens):

    every view (global + all tiles)  -> the same frozen timm encoders (our ``VisionTower``)
    -> the projector as the eager chain (``patch_projection_reference``: pooling, concatenation of
       the two encoders' features, ``nn.Linear``, ``nn.LayerNorm``), our projector's weights
    -> per sample, ``torch.cat`` of [BOS embedding, begin marker, its views' rows, end marker, the
       rest of its text embeddings], right-padded with zeros to the longest sample
    -> transformers' own ``LlamaForCausalLM`` / ``MixtralForCausalLM`` holding our LLM's weights
       (``save_hf_llm`` then ``from_pretrained``), ``attn_implementation="sdpa"`` with the padding
       mask, the eager loop over experts, and transformers' own loss over the full logits, on the
       same answer tokens and normalised by the same count (``num_items_in_batch``).

Labels follow transformers' convention (the label of the row holding a token is that token; the
model shifts them), which selects exactly the rows ``plan_layout``'s shifted labels select.
"""
from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sphinx_kernels import IGNORE_INDEX
from sphinx_kernels.projection import patch_projection_reference
from sphinx_model import SphinxX, TiledImage, save_hf_llm

# (token ids with BOS first, answer mask, tiled images): a sample as ``pack_samples`` takes it.
Sample = tuple[Sequence[int], Sequence[bool], Sequence[TiledImage]]

__all__ = ["PaddedBaseline", "PaddedBatch", "Sample"]


@dataclass
class PaddedBatch:
    """One padded micro-batch of ``B`` samples, ``V`` views (every tile), longest sample ``L`` rows.

    Attributes:
        text_ids: per sample, int64 ``[n_b]`` token ids (BOS first).
        views_per_image: per sample, the number of views of each of its images.
        dinov2_pixels, convnext_pixels: uint8 ``[V, 3, S, S]``: every view, in sample order.
        attention_mask: int64 ``[B, L]``, 1 on the samples' rows.
        labels: int64 ``[B, L]``: the token at each row where it is an answer token, else -100.
    """

    text_ids: list[torch.Tensor]
    views_per_image: list[list[int]]
    dinov2_pixels: torch.Tensor
    convnext_pixels: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def num_views(self) -> int:
        return self.dinov2_pixels.shape[0]


class PaddedBaseline:
    """transformers' decoder holding ``model.llm``'s weights, sharing ``model``'s encoders,
    projector and image markers (so both compute the same function of the same parameters).

    ``model`` must already be on ``device`` in its compute dtype; the decoder copy is made in the same
    dtype. Its trainable parameters: the decoder copy, the projector and the two markers.
    """

    def __init__(self, model: SphinxX, device: torch.device):
        import transformers

        self.model = model
        dtype = model.llm.embed_tokens.weight.dtype
        with tempfile.TemporaryDirectory() as tmp:
            save_hf_llm(model.llm, Path(tmp) / "llm")
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                Path(tmp) / "llm", dtype=dtype, attn_implementation="sdpa")
        if model.config.llm.num_experts:
            hf.set_experts_implementation("eager")  # the loop over experts
        self.hf = hf.to(device).train()

    def batch(self, samples: Sequence[Sample], device: torch.device) -> PaddedBatch:
        """The padded micro-batch of ``samples`` (whose images hold every tile), on ``device``."""
        tpv = self.model.config.vision.tokens_per_view
        lengths = [len(ids) + sum(2 + t.num_views * tpv for t in images)
                   for ids, _, images in samples]
        mask = torch.zeros(len(samples), max(lengths), dtype=torch.int64)
        labels = torch.full(mask.shape, IGNORE_INDEX, dtype=torch.int64)
        for b, ((ids, answer, images), length) in enumerate(zip(samples, lengths)):
            if any(any(t.skipped) for t in images):
                raise ValueError(f"samples[{b}] has skipped tiles: the baseline encodes every tile")
            mask[b, :length] = 1
            row_label = [i if a else IGNORE_INDEX for i, a in zip(ids, answer)]
            block = length - len(ids)  # the image blocks sit right after BOS
            labels[b, :1] = torch.tensor(row_label[:1])
            labels[b, 1 + block:length] = torch.tensor(row_label[1:], dtype=torch.int64)
        tiles = [t for _, _, images in samples for t in images]
        pixels = [torch.cat([getattr(t, name) for t in tiles]) if tiles else
                  torch.zeros(0, 3, size, size, dtype=torch.uint8)
                  for name, size in (("dinov2_pixels", self.model.config.vision.dinov2_image_size),
                                     ("convnext_pixels",
                                      self.model.config.vision.convnext_image_size))]
        return PaddedBatch([torch.tensor(ids, dtype=torch.int64, device=device)
                            for ids, _, _ in samples],
                           [[t.num_views for t in images] for _, _, images in samples],
                           pixels[0].to(device), pixels[1].to(device), mask.to(device),
                           labels.to(device))

    def inputs_embeds(self, batch: PaddedBatch) -> torch.Tensor:
        """``[B, L, H]``: every sample's rows assembled with ``torch.cat``, zero-padded."""
        model = self.model
        tokens, maps = model.vision(batch.dinov2_pixels, batch.convnext_pixels)
        projector = model.projector
        dtype = projector.proj.weight.dtype
        visual = patch_projection_reference(
            [tokens.to(dtype), maps.to(dtype)], projector.proj.weight, projector.proj.bias,
            grid=projector.grid, norm_weight=projector.norm.weight,
            norm_bias=projector.norm.bias, eps=projector.norm.eps)
        tpv = model.config.vision.tokens_per_view
        embed = self.hf.get_input_embeddings()
        rows, view = [], 0
        for ids, views in zip(batch.text_ids, batch.views_per_image):
            text = embed(ids)
            parts = [text[:1]]
            for count in views:
                parts += [model.image_begin[None], visual[view * tpv:(view + count) * tpv],
                          model.image_end[None]]
                view += count
            parts.append(text[1:])
            rows.append(torch.cat(parts))
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)

    def loss(self, batch: PaddedBatch, num_trained_tokens: int) -> torch.Tensor:
        """transformers' loss of one micro-batch: summed cross-entropy / ``num_trained_tokens``."""
        return self.hf(inputs_embeds=self.inputs_embeds(batch), attention_mask=batch.attention_mask,
                       labels=batch.labels, num_items_in_batch=num_trained_tokens).loss

    def parameters(self):
        model = self.model
        yield from self.hf.parameters()
        yield from model.projector.parameters()
        yield from (model.image_begin, model.image_end)

    def zero_grad(self) -> None:
        for param in self.parameters():
            param.grad = None
