"""The hf benchmark compares like with like: its packed batch (sphinx_varlen) and its padded batch
(sdpa) hold the same samples, and the model's loss is the same on both."""
import torch

from benchmarks import bench_hf
from sphinx_kernels.integrations import transformers as skt
from tests.integrations.tiny_hf import transformers  # noqa: F401  (skips without transformers)


def test_packed_and_padded_batches_give_the_same_loss(reference_ops):
    skt.register()
    cfg, cpu = bench_hf.CPU_QUICK, torch.device("cpu")
    batch = bench_hf.batches(cfg, cpu, seed=1)
    assert sum(batch["lengths"]) == cfg.tokens
    assert int(batch["padded"]["attention_mask"].sum()) == cfg.tokens
    model = bench_hf.llama(cfg, cpu)
    losses = {}
    with torch.no_grad():
        for implementation, layout in bench_hf.variants(cpu).values():
            model.set_attn_implementation(implementation)
            losses[layout] = model(**batch[layout]).loss
    torch.testing.assert_close(losses["packed"], losses["padded"])
