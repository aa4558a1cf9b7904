"""SPHINX-X: images -> frozen encoders -> fused projection -> packed sequence -> LLM.

One packed micro-batch (:class:`~sphinx_model.PackedBatch`) flows as::

    dinov2_pixels [V, 3, S1, S1], convnext_pixels [V, 3, S2, S2]   (uint8, kept views only)
        -> vision (frozen, no grad)      tokens [V, 1 + n*n, C_a], maps [V, C_b, m, m]
        -> projector (PatchProjector)    visual rows [V * (1 + g*g), H]   (Linear + LayerNorm)
        -> gather_rows([embed_tokens.weight, visual rows, skip, begin, end],
                       layout.source_ids, layout.row_ids)                 [T, H] packed inputs
        -> llm.hidden_states             [T, H] (+ the MoE routers' losses)
        -> llm.loss                      chunked cross-entropy at labelled rows

The tables of ``gather_rows`` are in the order of ``sphinx_kernels.SOURCE_*``. Skipped tiles cost
one row each (``skip_token``), never an encoder pass.

The model code holds no parallelism, activation checkpointing or compile
(``sphinx_model.parallel`` applies them from outside). It builds on the meta device:
``with torch.device("meta"): SphinxX(cfg)``, then ``to_empty(device=...)`` and
:meth:`SphinxX.init_weights`.

Checkpoints: :meth:`SphinxX.save_pretrained` / :meth:`SphinxX.from_pretrained` (``config.json`` and
safetensors, sharded with an index when large); :func:`load_accessory_sphinx` imports a released
LLaMA2-Accessory SPHINX checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from sphinx_kernels import IGNORE_INDEX, gather_rows
from sphinx_kernels.nn import PatchProjector
from sphinx_model.batch import PackedBatch
from sphinx_model.checkpoints import (
    MAX_SHARD_BYTES,
    SafetensorsDir,
    atomic_directory,
    write_safetensors,
)
from sphinx_model.config import SphinxConfig
from sphinx_model.llm import LLM
from sphinx_model.vision import VisionTower, check_state_keys

__all__ = ["CONFIG_FILE", "SphinxOutput", "SphinxX"]

CONFIG_FILE = "config.json"


class SphinxOutput(NamedTuple):
    """What one training forward returns (scalars are float32 tensors; nothing syncs the host)."""

    loss: torch.Tensor                        # [] lm_loss + the weighted MoE losses: backward this
    lm_loss: torch.Tensor                     # [] summed cross-entropy / the normaliser
    load_balancing_loss: torch.Tensor | None  # [] mean over MoE layers (None: dense decoder)
    z_loss: torch.Tensor | None               # [] mean over MoE layers (None: dense decoder)
    tokens_per_expert: torch.Tensor | None    # [L, E] int32 (token, slot) pairs per expert
    num_trained_tokens: torch.Tensor          # [] int64: labelled rows of this micro-batch


class SphinxX(nn.Module):
    """The SPHINX-X model of a :class:`~sphinx_model.SphinxConfig`.

    Submodules and parameters (the names checkpoints and the trainer rely on):

    - ``vision``: :class:`~sphinx_model.vision.VisionTower` (``vision.dinov2``,
      ``vision.convnext``: the frozen timm encoders);
    - ``projector``: ``sphinx_kernels.nn.PatchProjector`` (``projector.proj``: Linear
      ``[H, C_a + C_b]``, DINOv2 columns first; ``projector.norm``: LayerNorm ``[H]``);
    - ``skip_token``, ``image_begin``, ``image_end``: learnable ``[H]`` vectors (a skipped tile's
      row, the markers around each image);
    - ``llm``: :class:`~sphinx_model.LLM`.

    Calls: ``model(batch)`` (training: loss record), :meth:`embed` (packed input embeddings, e.g. a
    generation prefill), :meth:`hidden_states`, :meth:`logits` (inference).
    """

    def __init__(self, cfg: SphinxConfig, *, vision_chunk_views: int | None = None):
        super().__init__()
        if not isinstance(cfg, SphinxConfig):
            raise TypeError(f"cfg must be a SphinxConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.vision_chunk_views = vision_chunk_views  # encode at most this many views at a time
        hidden = cfg.llm.hidden_size
        self.vision = VisionTower(cfg.vision)
        self.projector = PatchProjector((cfg.vision.dinov2_channels, cfg.vision.convnext_channels),
                                        hidden, cfg.vision.grid, norm=cfg.projector.norm,
                                        bias=cfg.projector.bias, eps=cfg.projector.eps)
        self.skip_token = nn.Parameter(torch.empty(hidden))
        self.image_begin = nn.Parameter(torch.empty(hidden))
        self.image_end = nn.Parameter(torch.empty(hidden))
        self.llm = LLM(cfg.llm)
        self._init_vectors()

    @torch.no_grad()
    def _init_vectors(self) -> None:
        # Uniform [0, 1), as the reference initialises its image markers (start_img / end_img):
        # the scale of the LayerNorm-ed visual rows they sit among. The skip row stands in for a
        # tile's visual rows, so it starts on the same scale.
        for vector in (self.skip_token, self.image_begin, self.image_end):
            nn.init.uniform_(vector, 0.0, 1.0)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialises every parameter in place, e.g. after ``to_empty``: the encoders as timm
        does (then loads ``cfg.vision``'s weight files when it names them), the projector as
        ``nn.Linear`` / ``nn.LayerNorm`` do, the three vectors, and the LLM
        (``LLM.init_weights``)."""
        self.vision.init_weights()
        self.projector.proj.reset_parameters()
        if self.projector.norm is not None:
            self.projector.norm.reset_parameters()
        self._init_vectors()
        self.llm.init_weights()

    # ---------------------------------------------------------------------------------------------
    # Forward

    def visual_rows(self, dinov2_pixels: torch.Tensor, convnext_pixels: torch.Tensor
                    ) -> torch.Tensor:
        """``[V * (1 + g*g), H]``: the projected rows of ``V`` views (uint8 pixels as in
        :class:`~sphinx_model.PackedBatch`), each view's global row first, then its grid in raster
        order. Gradients reach the projector only (the encoders are frozen)."""
        tokens, maps = self.vision(dinov2_pixels, convnext_pixels,
                                   chunk_views=self.vision_chunk_views)
        dtype = self.projector.proj.weight.dtype
        return self.projector([tokens.to(dtype), maps.to(dtype)])

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """The packed input embeddings ``[T, H]`` of ``batch``: text embeddings, visual rows, skip
        rows and image markers where ``batch.layout`` puts them; zeros on padding rows."""
        layout = self._check_batch(batch)
        visual = self.visual_rows(batch.dinov2_pixels, batch.convnext_pixels)
        sources = [self.llm.embed_tokens.weight, visual, self.skip_token[None],
                   self.image_begin[None], self.image_end[None]]
        return gather_rows(sources, layout.source_ids, layout.row_ids)

    def hidden_states(self, batch: PackedBatch):
        """``(hidden [T, H], MoELosses or None)``: the LLM's final-norm states over the batch."""
        layout = batch.layout
        return self.llm.hidden_states(self.embed(batch), layout.cu_seqlens, layout.position_ids,
                                      max_seqlen=batch.max_seqlen, prefix_lens=batch.prefix_lens)

    def logits(self, batch: PackedBatch) -> torch.Tensor:
        """``[T, vocab]`` logits of every packed row (inference; training uses the chunked loss)."""
        return self.llm.logits(self.hidden_states(batch)[0])

    def forward(self, batch: PackedBatch, num_trained_tokens: int | torch.Tensor | None = None, *,
                load_balancing_weight: float = 0.0, z_loss_weight: float = 0.0,
                chunk_rows: int | None = None) -> SphinxOutput:
        """A training forward of one packed micro-batch.

        Args:
            batch: the micro-batch, on the model's device.
            num_trained_tokens: the loss normaliser; the trainer passes the labelled rows of the
                whole global batch (all ranks and micro-batches), so that the micro-batches' losses
                sum to the global mean. None: this batch's labelled rows (at least 1).
            load_balancing_weight, z_loss_weight: weights of the MoE routers' losses added to
                ``loss`` (their means over layers, per micro-batch: scale by 1 / micro-batches when
                accumulating).
            chunk_rows: labelled rows per logits chunk of the loss (see ``LLM.loss``).
        """
        hidden, moe = self.hidden_states(batch)
        labels = batch.layout.labels
        trained = (labels != IGNORE_INDEX).sum()
        normaliser = trained.clamp(min=1) if num_trained_tokens is None else num_trained_tokens
        lm_loss = self.llm.loss(hidden, labels, normaliser, chunk_rows=chunk_rows)
        if moe is None:
            return SphinxOutput(lm_loss, lm_loss, None, None, None, trained)
        loss = (lm_loss + load_balancing_weight * moe.load_balancing_loss
                + z_loss_weight * moe.z_loss)
        return SphinxOutput(loss, lm_loss, moe.load_balancing_loss, moe.z_loss,
                            moe.tokens_per_expert, trained)

    def _check_batch(self, batch: PackedBatch):
        if not isinstance(batch, PackedBatch):
            raise TypeError(f"batch must be a PackedBatch, got {type(batch).__name__}")
        layout = batch.layout
        per_view = self.config.vision.tokens_per_view
        if layout.visual_rows.shape[0] != batch.num_views * per_view:
            raise ValueError(f"batch.layout has {layout.visual_rows.shape[0]} visual rows but the "
                             f"batch has {batch.num_views} views of {per_view} rows (was the "
                             "layout planned with tokens_per_view = vision.tokens_per_view?)")
        return layout

    # ---------------------------------------------------------------------------------------------
    # Checkpoints

    def save_pretrained(self, path: str | os.PathLike, *,
                        max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
        """Writes ``config.json`` and the weights as safetensors (``model.safetensors``, or shards
        with ``model.safetensors.index.json`` past ``max_shard_bytes``) into a temporary directory
        beside ``path``, then renames it onto ``path``. The parameters must be plain tensors: gather
        a sharded model's state dict first."""
        state = self.checkpoint_state()
        for key, tensor in state.items():
            if type(tensor) is not torch.Tensor:
                raise TypeError(f"{key} is a {type(tensor).__name__}, not a plain tensor: gather "
                                "the full state dict of a sharded model before saving")
        with atomic_directory(path) as tmp:
            write_safetensors(state, tmp, max_shard_bytes)
            (tmp / CONFIG_FILE).write_text(self.config.to_json())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> SphinxX:
        """A model saved by :meth:`save_pretrained`: built on the meta device, every tensor
        assigned from the files (in its stored dtype, or ``dtype`` for floating tensors; on
        ``device``, default the CPU). Missing or unexpected keys and shape mismatches are
        ``ValueError`` naming them."""
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path / CONFIG_FILE}: no config.json (is {path} a directory "
                                    "written by SphinxX.save_pretrained?)")
        cfg = SphinxConfig.from_json((path / CONFIG_FILE).read_text())
        with torch.device("meta"):
            model = cls(cfg)
        tensors = SafetensorsDir(path)
        expected = model.checkpoint_state()
        check_state_keys(expected, tensors, str(path), shapes=False)
        device = torch.device(device or "cpu")
        state = {}
        for key, like in expected.items():
            tensor = tensors[key]
            if tuple(tensor.shape) != tuple(like.shape):
                raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, the model "
                                 f"{tuple(like.shape)} (does config.json match the weights?)")
            cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            state[key] = tensor.to(device=device, dtype=cast)
        model.assign_state(state, device)
        return model

    def assign_state(self, state: dict[str, torch.Tensor], device: torch.device | str) -> None:
        """Assigns a complete state dict (keyed as :meth:`checkpoint_state`, tensors already on
        ``device``) to a model built on the meta device, re-ties tied weights and materialises the
        non-persistent buffers (the LLM's rotary tables) on ``device``."""
        self.load_state_dict(state, strict=False, assign=True)
        if self.config.llm.tie_word_embeddings:
            self.llm.lm_head.weight = self.llm.embed_tokens.weight
        for module in self.modules():
            for name, buffer in module.named_buffers(recurse=False):
                if buffer.is_meta:
                    setattr(module, name, torch.empty_like(buffer, device=device))
        self.llm.init_rotary()
        still_meta = [k for k, t in self.state_dict().items() if t.is_meta]
        if still_meta:
            raise ValueError(f"no weights for {', '.join(still_meta)}")

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds (``state_dict`` keys): every parameter and persistent buffer,
        the LM head left out when it is the tied embedding."""
        state = self.state_dict()
        if self.config.llm.tie_word_embeddings:
            state.pop("llm.lm_head.weight")
        return state
