"""The layer-level benchmark compares like with like: its packed kernel path and its padded baseline
(transformers' own attention and MoE block) compute the same function of the same batch (real tokens
only), and the workload has what it claims (skipped tiles, aspect ratios both ways, text lengths in
range)."""
import pytest
import torch

from benchmarks import bench_layer


def test_packed_and_padded_paths_agree():
    pytest.importorskip("transformers", reason="the padded baseline is transformers' own layer")
    cfg = bench_layer.CPU_QUICK
    torch.manual_seed(0)
    model = bench_layer.Step(cfg, torch.device("cpu"))
    batch = bench_layer.make_batch(cfg, torch.device("cpu"), seed=3)
    packed = bench_layer.kernel_step(model, batch)
    padded = bench_layer.padded_step(model, batch, bench_layer.transformers_layer(model.layer))
    cu = batch["layout"]["cu_seqlens"].tolist()
    for b in range(cfg.samples):
        n = cu[b + 1] - cu[b]
        torch.testing.assert_close(packed[cu[b]:cu[b + 1]], padded[b, :n], rtol=1e-4, atol=1e-4)


def test_workload_skips_tiles_and_spans_the_ranges():
    cfg = bench_layer.CPU
    samples = [s for seed in range(20) for s in bench_layer.synthetic_samples(cfg, seed)]
    skipped = [sum(s.images[0].skipped) for s in samples]
    assert min(skipped) == 0 and max(skipped) > 0
    lengths = [len(s.text) for s in samples]
    assert cfg.text_range[0] <= min(lengths) and max(lengths) <= cfg.text_range[1]
    # Both orientations appear: tiles skipped along rows (wide images) and along columns (tall).
    wide = tall = False
    for s in samples:
        grid = torch.tensor(s.images[0].skipped).view(cfg.canvas, cfg.canvas)
        wide |= bool(grid[-1].all() and not grid[:, -1].all())
        tall |= bool(grid[:, -1].all() and not grid[-1].all())
    assert wide and tall
