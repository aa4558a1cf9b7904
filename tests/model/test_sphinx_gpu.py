"""On a GPU: tinyllama-1.1b SPHINX-X (real encoders, random weights) in bf16, forward and backward
on a realistic packed batch (16k rows, half the samples with a 2x2-tile image), every op on a GPU
backend, logits within the DESIGN.md rule of the reference backends'; tokens/s and peak memory are
printed and, when ``OUT`` is set, written to ``$OUT/sphinx_gpu_check.json``."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

import sphinx_model as sm
from sphinx_kernels import IGNORE_INDEX, ImageSpec, SampleSpec, layout_inputs, plan_layout
from sphinx_kernels.backends import REFERENCE, OpBackends

ROWS = 16384


def realistic_batch(cfg: sm.SphinxConfig, rows: int, seed: int = 0) -> sm.PackedBatch:
    """Samples of about 600-1400 rows filling exactly ``rows``; every other one holds a 2x2-tile
    image of a random aspect ratio (some tiles skipped) right after BOS. Random pixels and tokens;
    the second half of each sample's text is its answer."""
    gen = torch.Generator().manual_seed(seed)
    vision, tpv = cfg.vision, cfg.vision.tokens_per_view
    specs, dinov2, convnext, used = [], [], [], 0
    while used < rows:
        images, image_rows = [], 0
        if len(specs) % 2 == 0:
            width, height = (int(v) for v in torch.randint(200, 1200, (2,), generator=gen))
            _, _, skipped = sm.tile_geometry(width, height, vision.tiles)
            views = 1 + skipped.count(False)
            image_rows = views * tpv + skipped.count(True) + 2
            if used + image_rows + 2 <= rows:
                images.append(ImageSpec(vision.tiles, vision.tiles, skipped))
                for pixels, side in ((dinov2, vision.dinov2_image_size),
                                     (convnext, vision.convnext_image_size)):
                    pixels.append(torch.randint(0, 256, (views, 3, side, side), generator=gen,
                                                dtype=torch.uint8))
            else:
                image_rows = 0
        text = min(int(torch.randint(600, 1400, (), generator=gen)), rows - used - image_rows)
        ids = torch.randint(3, cfg.llm.vocab_size, (text,), generator=gen).tolist()
        ids[0] = cfg.llm.bos_token_id
        answer = [i >= text // 2 for i in range(text)]
        specs.append(SampleSpec(text=ids, answer=answer, images=images, text_before_images=1))
        used += image_rows + text
    layout = plan_layout(layout_inputs(specs), tpv, length=rows)
    lengths = layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]
    return sm.PackedBatch(layout, torch.cat(dinov2), torch.cat(convnext),
                          max_seqlen=int(lengths.max()), num_samples=len(specs))


@pytest.mark.gpu
def test_tinyllama_bf16_on_gpu_backends(monkeypatch):
    record = check_model(sm.preset("tinyllama-1.1b"), torch.device("cuda"), ROWS, monkeypatch)
    print(json.dumps(record, indent=2))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "sphinx_gpu_check.json"), "w") as f:
            json.dump(record, f, indent=2)
    assert not record["reference_ops"], record
    assert record["logits_rel_error"] <= 2 * record["reference_bf16_rel_error"] + 1e-3, record


def check_model(cfg: sm.SphinxConfig, device: torch.device, rows: int, monkeypatch) -> dict:
    """Builds ``cfg`` with random weights in bf16 on ``device``, times a forward and backward of
    :func:`realistic_batch`, records which backend served each op, and measures the logits' error
    at the labelled rows against the reference backends in float32, next to the reference
    backends' own error in bf16."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = sm.SphinxX(cfg)
    model = model.to(torch.bfloat16).to_empty(device=device)
    model.init_weights()
    batch = realistic_batch(cfg, rows).to(device)
    chosen: dict[str, set[str]] = {}
    select = OpBackends.select

    def spy(self, request, backend=None):
        picked = select(self, request, backend)
        chosen.setdefault(self.op, set()).add(picked.name)
        return picked

    monkeypatch.setattr(OpBackends, "select", spy)
    model(batch).loss.backward()  # warm-up (Triton compiles)
    model.zero_grad(set_to_none=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    start = time.perf_counter()
    out = model(batch)
    out.loss.backward()
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    assert torch.isfinite(out.loss)
    backends = {op: sorted(names) for op, names in chosen.items()}
    with torch.no_grad():
        logits = model.logits(batch)
        monkeypatch.setenv("SPHINX_KERNELS_BACKEND", "reference")
        reference_bf16 = model.logits(batch)
        exact = model.float().logits(batch)  # the reference backends in float32
    rows_trained = (batch.layout.labels != IGNORE_INDEX).nonzero().flatten()

    def error(x):
        x, ref = x[rows_trained].float(), exact[rows_trained]
        return ((x - ref).norm() / ref.norm()).item()

    return {"rows": rows, "samples": batch.num_samples, "views": batch.num_views,
            "seconds_fwd_bwd": seconds, "tokens_per_s": rows / seconds,
            "peak_memory_gib": peak / 2**30, "logits_rel_error": error(logits),
            "reference_bf16_rel_error": error(reference_bf16), "backends": backends,
            "reference_ops": [op for op, names in backends.items() if REFERENCE.name in names]}
