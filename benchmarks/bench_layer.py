"""Layer-level benchmark: the three kernel families strung together the way a SPHINX-X training step
uses them, against the padded baseline users write today.

    python -m benchmarks --family layer [--quick]

Workload (seeded, synthetic): samples of one image each, its aspect ratio drawn log-uniformly from
1:4 to 4:1 and fitted to a canvas of ``canvas x canvas`` sub-image tiles (tiles outside the image
are pure padding), and a text of 32 to 2048 tokens (log-uniform; 32 to 256 on the CPU) whose second
half is the answer. One step, forward and backward:

- sphinx_kernels: the layout is planned on the CPU (``plan_layout``; the data loader's work, outside
  the timed step); only the global view and the kept tiles go through the encoders; one
  ``patch_projection`` (resampling, Linear, LayerNorm) projects them; ``gather_rows`` assembles the
  packed sequence (text embeddings, visual rows, skip / begin / end vectors); one decoder layer
  (RMSNorm, ``nn.VarlenSelfAttention``, RMSNorm, ``nn.MoEMLP``) runs on the packed tokens.
- padded baseline: every tile of the canvas is encoded; the projection is the eager chain
  (``patch_projection_reference``: pool, transposing copy, concatenating copy, Linear, LayerNorm);
  every sample is padded to the longest; attention is transformers' own ``LlamaAttention`` (eager,
  a padding-and-causal mask) on the layer's projections, the MoE transformers' own
  ``MixtralSparseMoeBlock`` (its loop over experts) holding the layer's expert weights. It needs
  transformers, and is skipped with the reason without it.

The frozen encoders are stood in for by one linear patch embedding per encoder (DINOv2-like tokens,
a ConvNeXt-like map read through its strides): real encoders cost far more per view, so the saving
from skipped tiles is understated here. Reported: tokens/s (real tokens, padding excluded), ms per
step, peak memory, and the ratio to the baseline.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

import sphinx_kernels
from benchmarks import transformers_baselines
from benchmarks.bench_moe import TOP_K
from benchmarks.harness import RESULTS_DIR, run_family, time_ms
from benchmarks.peers import peer_missing
from benchmarks.rows import Row
from sphinx_kernels import nn as sk_nn
from sphinx_kernels.dtypes import dtype_name
from sphinx_kernels.ops.patch_projection import patch_projection_reference
from sphinx_kernels.ops.plan_layout import ImageSpec, SampleSpec, layout_inputs, plan_layout

OURS, BASELINE = "sphinx_kernels layer", "padded transformers (eager)"


@dataclass(frozen=True)
class LayerConfig:
    samples: int
    text_range: tuple[int, int]
    canvas: int           # tiles per side of the any-resolution canvas
    grid: int             # visual tokens per view: 1 + grid * grid
    patch: int            # stand-in encoders' input width per token (pixels of one patch)
    channels: tuple[int, int]  # encoder widths (DINOv2, ConvNeXt)
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    experts: int
    top_k: int
    vocab: int
    dtype: torch.dtype


GPU = LayerConfig(samples=8, text_range=(32, 2048), canvas=3, grid=16, patch=588,
                  channels=(1536, 3072), hidden=2048, heads=16, kv_heads=4, ffn=5632, experts=8,
                  top_k=TOP_K, vocab=32000, dtype=torch.bfloat16)
GPU_QUICK = LayerConfig(**{**GPU.__dict__, "samples": 4})
CPU = LayerConfig(samples=4, text_range=(32, 256), canvas=3, grid=4, patch=48, channels=(48, 96),
                  hidden=128, heads=4, kv_heads=2, ffn=256, experts=4, top_k=TOP_K, vocab=1000,
                  dtype=torch.float32)
CPU_QUICK = LayerConfig(**{**CPU.__dict__, "samples": 2})


def synthetic_samples(cfg: LayerConfig, seed: int) -> list[SampleSpec]:
    """Samples of one image (aspect ratio 1:4 to 4:1 on the canvas) and a text whose second half is
    the answer."""
    rng = random.Random(seed)
    samples = []
    for _ in range(cfg.samples):
        ratio = math.exp(rng.uniform(math.log(1 / 4), math.log(4)))  # width / height
        # The long side spans the canvas; the short side covers only as many tiles as it reaches.
        short = max(1, math.ceil(cfg.canvas / max(ratio, 1 / ratio) - 1e-9))
        rows, cols = (short, cfg.canvas) if ratio >= 1 else (cfg.canvas, short)
        skipped = [r >= rows or c >= cols for r in range(cfg.canvas) for c in range(cfg.canvas)]
        length = int(math.exp(rng.uniform(*map(math.log, cfg.text_range))))
        text = [rng.randrange(cfg.vocab) for _ in range(length)]
        answer = [i >= length // 2 for i in range(length)]
        samples.append(SampleSpec(text, answer, [ImageSpec(cfg.canvas, cfg.canvas, skipped)]))
    return samples


class StandInEncoders(torch.nn.Module):
    """Frozen stand-ins for DINOv2 (a CLS token and a token grid) and CLIP-ConvNeXt (a
    channels-first map): one patch embedding each. Input ``[V, grid * grid, patch]`` pixels of the
    views."""

    def __init__(self, cfg: LayerConfig, device):
        super().__init__()
        self.grid = cfg.grid
        self.dino = torch.nn.Linear(cfg.patch, cfg.channels[0], device=device, dtype=cfg.dtype)
        self.convnext = torch.nn.Linear(cfg.patch, cfg.channels[1], device=device, dtype=cfg.dtype)
        self.cls = torch.nn.Parameter(torch.randn(cfg.channels[0], device=device, dtype=cfg.dtype))
        self.requires_grad_(False)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        views = pixels.shape[0]
        tokens = torch.cat([self.cls.expand(views, 1, -1), self.dino(pixels)], dim=1)
        # The map in channels-first layout as a strided view of channels-last storage (no copy):
        # how a ConvNeXt's output usually arrives.
        feature_map = self.convnext(pixels).view(views, self.grid, self.grid, -1)
        feature_map = feature_map.permute(0, 3, 1, 2)
        return tokens, feature_map


class DecoderLayer(torch.nn.Module):
    """One Mixtral-style decoder layer on packed tokens: RMSNorm, attention, RMSNorm, MoE MLP."""

    def __init__(self, cfg: LayerConfig, device):
        super().__init__()
        factory = {"device": device, "dtype": cfg.dtype}
        self.input_norm = torch.nn.RMSNorm(cfg.hidden, **factory)
        self.attention = sk_nn.VarlenSelfAttention(cfg.hidden, cfg.heads, cfg.kv_heads,
                                                   max_position_embeddings=8192, **factory)
        self.post_norm = torch.nn.RMSNorm(cfg.hidden, **factory)
        self.mlp = sk_nn.MoEMLP(cfg.hidden, cfg.ffn, cfg.experts, cfg.top_k, **factory)


class Step(torch.nn.Module):
    """Everything trained in one step (projector, special vectors, embeddings, one layer), shared by
    both paths so they compute the same function."""

    def __init__(self, cfg: LayerConfig, device):
        super().__init__()
        factory = {"device": device, "dtype": cfg.dtype}
        self.cfg = cfg
        self.encoders = StandInEncoders(cfg, device)
        self.projector = sk_nn.PatchProjector(cfg.channels, cfg.hidden, (cfg.grid, cfg.grid),
                                              **factory)
        self.embed = torch.nn.Embedding(cfg.vocab, cfg.hidden, **factory)
        # The skip, begin and end vectors.
        self.special = torch.nn.Parameter(torch.randn(3, cfg.hidden, **factory) * 0.02)
        self.layer = DecoderLayer(cfg, device)


def kernel_step(model: Step, batch: dict) -> torch.Tensor:
    """The packed path: encode kept views, fused projection, one-pass assembly, varlen layer."""
    layout = batch["layout"]
    with torch.no_grad():
        tokens, feature_map = model.encoders(batch["kept_pixels"])
    projector = model.projector
    visual = sphinx_kernels.patch_projection(
        [tokens, feature_map], projector.proj.weight, projector.proj.bias, grid=projector.grid,
        norm_weight=projector.norm.weight, norm_bias=projector.norm.bias)
    skip, begin, end = model.special.split(1)
    x = sphinx_kernels.gather_rows([model.embed.weight, visual, skip, begin, end],
                                   layout["source_ids"], layout["row_ids"])
    layer = model.layer
    x = x + layer.attention(layer.input_norm(x), layout["cu_seqlens"], layout["position_ids"],
                            max_seqlen=layout["max_seqlen"])
    moe, _ = layer.mlp(layer.post_norm(x))
    return x + moe


def transformers_layer(layer: DecoderLayer) -> tuple[torch.nn.Module, torch.nn.Module]:
    """transformers' own LlamaAttention on the layer's projections (the same parameters) and
    MixtralSparseMoeBlock holding a copy of its experts and router: the padded baseline's layer."""
    attention, mlp = layer.attention, layer.mlp
    return (transformers_baselines.llama_attention(
                attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                attention.num_heads, attention.num_kv_heads, attention.head_dim),
            transformers_baselines.mixtral_moe_block(mlp.router.weight.detach(), mlp.w1.detach(),
                                                     mlp.w3.detach(), mlp.w2.detach(), mlp.top_k))


def padded_step(model: Step, batch: dict, hf_layer: tuple[torch.nn.Module, torch.nn.Module]
                ) -> torch.Tensor:
    """The padded path: encode every tile, eager projection, pad to the longest sample,
    transformers' attention and MoE block (``transformers_layer(model.layer)``)."""
    with torch.no_grad():
        tokens, feature_map = model.encoders(batch["all_pixels"])
    projector = model.projector
    visual = patch_projection_reference(
        [tokens, feature_map], projector.proj.weight, projector.proj.bias, grid=projector.grid,
        norm_weight=projector.norm.weight, norm_bias=projector.norm.bias)
    skip, begin, end = model.special.split(1)
    # The same packed rows, placed into [B, L] by the padded layout's index (a scatter users write).
    sources = [model.embed.weight, visual, skip, begin, end]
    rows = torch.cat([torch.zeros(1, visual.shape[1], device=visual.device, dtype=visual.dtype)]
                     + [src[idx] for src, idx in zip(sources, batch["padded_indices"])])
    x = rows[batch["padded_gather"]]                                   # [B, L, H]
    layer, (attention, moe_block) = model.layer, hf_layer
    length = x.shape[1]
    rotary = (t[:length].to(x.dtype).expand(x.shape[0], -1, -1)
              for t in (layer.attention.rotary_cos, layer.attention.rotary_sin))
    attended, _ = attention(layer.input_norm(x), position_embeddings=tuple(rotary),
                            attention_mask=batch["padded_mask"])
    x = x + attended
    moe = transformers_baselines.moe_block_output(moe_block, layer.post_norm(x).flatten(0, 1))
    return x + moe.view_as(x)


def make_batch(cfg: LayerConfig, device, seed: int) -> dict:
    """Both paths' inputs for one synthetic batch; the planning is the data loader's (not timed)."""
    samples = synthetic_samples(cfg, seed)
    tokens_per_view = 1 + cfg.grid * cfg.grid
    layout = plan_layout(layout_inputs(samples), tokens_per_view)
    gen = torch.Generator().manual_seed(seed)
    views_per_image = 1 + cfg.canvas * cfg.canvas
    all_pixels = torch.randn(cfg.samples * views_per_image, cfg.grid * cfg.grid, cfg.patch,
                             generator=gen).to(device, cfg.dtype)
    # Views that exist in the packed path: each image's global view, then its kept tiles.
    kept = [[True] + [not s for s in sample.images[0].skipped] for sample in samples]
    kept_index = torch.tensor([b * views_per_image + v for b, flags in enumerate(kept)
                               for v, keep in enumerate(flags) if keep])
    cu = layout.cu_seqlens
    lengths = (cu[1:] - cu[:-1]).tolist()
    longest = max(lengths)
    # Padded layout: sample b's row t sits at [b, t]; index 0 of the row table is a zero row.
    source_ids, row_ids = layout.source_ids, layout.row_ids
    padded_indices, offset, remap = [], 1, torch.zeros(source_ids.shape, dtype=torch.long)
    for s in range(5):
        hit = source_ids == s
        ids = row_ids[hit]
        if s == 1:  # visual rows of the kept views, in the padded path's every-view numbering
            view = kept_index[ids // tokens_per_view]
            ids = view * tokens_per_view + ids % tokens_per_view
        padded_indices.append(ids.to(device))
        remap[hit] = offset + torch.arange(int(hit.sum()))
        offset += int(hit.sum())
    gather = torch.zeros(cfg.samples, longest, dtype=torch.long)
    mask = torch.full((cfg.samples, 1, longest, longest), float("-inf"))
    for b, n in enumerate(lengths):
        gather[b, :n] = remap[cu[b]:cu[b + 1]]
        mask[b, 0, :n, :n] = torch.zeros(n, n).masked_fill(
            torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        mask[b, 0, n:, :] = 0.0  # padding queries attend everywhere (finite, ignored)
    return {
        "layout": {"source_ids": source_ids.to(device), "row_ids": row_ids.to(device),
                   "cu_seqlens": cu.to(device), "position_ids": layout.position_ids.to(device),
                   "max_seqlen": longest},
        "kept_pixels": all_pixels[kept_index.to(device)],
        "all_pixels": all_pixels,
        "padded_indices": padded_indices,
        "padded_gather": gather.to(device),
        "padded_mask": mask.to(device, cfg.dtype),
        "real_tokens": int(cu[-1]),
        "padded_tokens": cfg.samples * longest,
        "kept_views": len(kept_index),
        "all_views": cfg.samples * views_per_image,
    }


def bench_layer(device: torch.device, quick: bool, ceiling_gbps: float | None) -> list[Row]:
    if device.type == "cuda":
        cfg = GPU_QUICK if quick else GPU
    else:
        cfg = CPU_QUICK if quick else CPU
    torch.manual_seed(0)
    model = Step(cfg, device)
    batches = [make_batch(cfg, device, seed) for seed in range(2)]
    real = batches[0]["real_tokens"]
    shape = (f"B={cfg.samples} tokens={real} (padded {batches[0]['padded_tokens']}) views="
             f"{batches[0]['kept_views']}/{batches[0]['all_views']} H={cfg.hidden} E={cfg.experts}")
    steps = [(OURS, kernel_step)]
    if peer_missing("transformers", device) is None:  # else listed with its reason
        hf_layer = transformers_layer(model.layer)
        steps.append((BASELINE, lambda m, b: padded_step(m, b, hf_layer)))
    grads = {}
    rows = []
    for name, step in steps:
        def train_step(batch, step=step, name=name):
            out = step(model, batch)
            key = (name, id(batch))
            if key not in grads:
                grads[key] = torch.randn_like(out)
            out.backward(grads[key])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ms = time_ms(train_step, batches, device, warmup=2, repeats=5 if quick else 10)
        tokens_per_s = sum(b["real_tokens"] for b in batches) / len(batches) / ms * 1e3
        extra = {"tokens_per_s": tokens_per_s}
        if device.type == "cuda":
            extra["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        rows.append(Row("layer fwd+bwd", shape, dtype_name(cfg.dtype), name, ms,
                        extra=extra))
        model.zero_grad(set_to_none=True)
    for r in rows:
        memory = (f", peak {r.extra['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in r.extra
                  else "")
        print(f"{r.backend}: {r.extra['tokens_per_s']:.0f} tokens/s{memory}")
    return rows


def run(device: torch.device, quick: bool, results_dir: str = RESULTS_DIR) -> list[Row]:
    return run_family("layer", device, quick, (bench_layer,), (OURS,), (BASELINE,),
                      results_dir=results_dir)
