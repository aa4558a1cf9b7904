"""The end-to-end training benchmark compares like with like: on the same samples and weights, its
padded transformers baseline computes the loss of our model with every tile encoded (``skip tokens
off``), and packing off, kernels off and the full-logit loss compute our loss; and the workload has what the benchmark
claims (skipped tiles, text-only samples, several micro-batches)."""
import pytest
import torch

from benchmarks import bench_train
from sphinx_kernels.backends import ENV_BACKEND
from sphinx_model.tiling import PAD_COLOR

transformers = pytest.importorskip("transformers", minversion="5.0")


@pytest.fixture(scope="module")
def quick_setup():
    """The quick CPU workload, our model and the baseline, with the backends the benchmark process
    selects (no Triton interpreter: the C++ kernels where there are, else the references)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the benchmark runs (two threads on a shared machine thrash)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRITON_INTERPRET", raising=False)
        patch.delenv(ENV_BACKEND, raising=False)
        bench = bench_train.CPU_QUICK[0]
        cpu = torch.device("cpu")
        cfg = bench.model_config()
        data = bench_train.SphinxData.from_config(
            bench_train.DataConfig(path="demo", budget=bench.budget,
                                   global_batch=bench.global_batch, num_workers=0), cfg)
        workload = bench_train.build_workload(data, 0, cpu)
        model = bench_train.build_model(cfg, torch.float32, cpu)
        baseline = bench_train.PaddedBaseline(model, cpu)
        yield workload, model, baseline, bench_train.variant_steps(model, baseline, [workload],
                                                                   cpu)
    torch.set_num_threads(threads)


def test_every_variant_computes_the_loss_it_should(quick_setup):
    _, model, _, steps = quick_setup
    lm_loss = {}
    for name, (step, inputs) in steps.items():
        losses = step(inputs[0])
        lm_loss[name] = losses if name == bench_train.BASELINE else losses[1]
        assert all(p.grad is None for p in model.parameters())  # each step clears its gradients
    ours = lm_loss[bench_train.OURS]
    for name in (bench_train.PACKING_OFF, bench_train.KERNELS_OFF, bench_train.FULL_LOGITS):
        torch.testing.assert_close(lm_loss[name], ours, rtol=1e-5, atol=0)
    # The baseline encodes every tile, as skip tokens off does: the same loss, not ours.
    torch.testing.assert_close(lm_loss[bench_train.BASELINE], lm_loss[bench_train.SKIP_OFF],
                               rtol=1e-5, atol=0)
    assert abs(float(lm_loss[bench_train.SKIP_OFF] - ours)) > 1e-4


def test_workload_has_skipped_tiles_text_only_samples_and_padding(quick_setup):
    workload, _, baseline, _ = quick_setup
    ours, packing_off, skip_off = workload.ours, workload.packing_off, workload.skip_off
    assert len(ours.micro_batches) > 1
    assert sum(mb.num_skipped_tiles for mb in ours.micro_batches) > 0
    assert sum(mb.num_skipped_tiles for mb in skip_off.micro_batches) == 0
    views = sum(mb.num_views for mb in ours.micro_batches)
    assert sum(mb.num_views for mb in skip_off.micro_batches) > views
    chunks = workload.baseline_samples
    assert any(not images for chunk in chunks for _, _, images in chunk)  # text-only samples
    # Packing off: the same samples in as many micro-batches, each sample padded to its longest.
    assert len(packing_off.micro_batches) == len(ours.micro_batches) == len(chunks)
    assert packing_off.stats.samples == ours.stats.samples
    assert packing_off.stats.trained_tokens == ours.stats.trained_tokens
    for mb in packing_off.micro_batches:
        assert len(set((mb.layout.cu_seqlens[1:] - mb.layout.cu_seqlens[:-1]).tolist())) == 1
    assert packing_off.stats.rows > ours.stats.rows
    # The baseline's batches: one per chunk, padded to the longest sample, the same labelled rows.
    batches = [baseline.batch(chunk, torch.device("cpu")) for chunk in chunks]
    assert sum(int((b.labels != -100).sum()) for b in batches) == ours.stats.trained_tokens
    assert sum(b.num_views for b in batches) == sum(mb.num_views for mb in skip_off.micro_batches)


def test_every_tile_fills_skipped_tiles_with_the_padding_colour(quick_setup):
    workload, model, _, _ = quick_setup
    vision = model.config.vision
    tiled = next(images[0] for chunk in workload.baseline_samples for _, _, images in chunk
                 if images)
    skipped = bench_train.TiledImage(tiled.rows, tiled.cols, [False, True, False, True],
                                     tiled.dinov2_pixels[:3], tiled.convnext_pixels[:3])
    full = bench_train.every_tile(skipped, vision)
    assert full.skipped == [False] * 4 and full.num_views == 5
    for name in ("dinov2_pixels", "convnext_pixels"):
        pixels, kept = getattr(full, name), getattr(skipped, name)
        assert torch.equal(pixels[[0, 1, 3]], kept)
        padding = torch.tensor(PAD_COLOR, dtype=torch.uint8).view(3, 1, 1)
        assert bool((pixels[[2, 4]] == padding).all())
