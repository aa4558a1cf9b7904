"""sphinx_model.LLM: packed batches equal their samples run alone, padding and zero-length samples,
the bidirectional prefix, the KV-cache hook, meta-device build, MoE losses, bad input."""
import pytest
import torch

from sphinx_model import LLM, SimpleKVCache
from sphinx_model.llm import packed_position_ids
from tests.model.common import TINY_DENSE, TINY_MOE, pack, relative_error


@pytest.mark.parametrize("cfg", [TINY_DENSE, TINY_MOE], ids=["dense", "moe"])
def test_packed_batch_equals_each_sample_alone(cfg, monkeypatch):
    if cfg.num_experts:  # the MoE kernels run packed in the Mixtral parity test; save the time here
        monkeypatch.setenv("SPHINX_KERNELS_BACKEND", "reference")
    torch.manual_seed(0)
    llm = LLM(cfg)
    samples = [torch.randint(0, cfg.vocab_size, (n,)) for n in (5, 0, 9, 1)]
    prefixes = torch.tensor([3, 0, 4, 1], dtype=torch.int32)
    ids, cu = pack(samples, padding=3)
    with torch.no_grad():
        packed = llm(ids, cu, max_seqlen=9, prefix_lens=prefixes)
        assert packed.shape == (ids.shape[0], cfg.vocab_size)
        assert torch.equal(packed[cu[-1]:], torch.zeros_like(packed[cu[-1]:]))  # padding rows
        for b, sample in enumerate(samples):
            if not len(sample):
                continue
            alone = llm(sample, torch.tensor([0, len(sample)], dtype=torch.int32),
                        prefix_lens=prefixes[b:b + 1])
            assert relative_error(packed[cu[b]:cu[b + 1]], alone) <= 1e-5


def test_prefix_rows_attend_bidirectionally(reference_kernels):
    torch.manual_seed(0)
    llm = LLM(TINY_DENSE)
    ids = torch.randint(0, TINY_DENSE.vocab_size, (6,))
    changed = ids.clone()
    changed[2] = (ids[2] + 1) % TINY_DENSE.vocab_size
    cu, prefix = torch.tensor([0, 6], dtype=torch.int32), torch.tensor([3], dtype=torch.int32)
    with torch.no_grad():
        causal, causal_changed = llm(ids, cu), llm(changed, cu)
        bidir, bidir_changed = llm(ids, cu, prefix_lens=prefix), llm(changed, cu, prefix_lens=prefix)
    assert torch.equal(causal[:2], causal_changed[:2])  # rows 0, 1 do not see row 2 ...
    assert not torch.allclose(bidir[0], bidir_changed[0])  # ... unless it is in their prefix


def test_positions_reset_per_sample_and_follow_cached_rows():
    cu = torch.tensor([0, 3, 3, 5], dtype=torch.int32)
    assert packed_position_ids(cu, 7).tolist() == [0, 1, 2, 0, 1, 0, 0]
    offsets = torch.tensor([4, 9, 1])
    assert packed_position_ids(cu, 7, offsets).tolist() == [4, 5, 6, 1, 2, 0, 0]


@pytest.mark.parametrize("cfg", [TINY_DENSE, TINY_MOE], ids=["dense", "moe"])
def test_incremental_decoding_with_cache_equals_recomputing_the_prefix(cfg, reference_kernels):
    torch.manual_seed(1)
    llm = LLM(cfg)
    sequences = [torch.randint(0, cfg.vocab_size, (n,)) for n in (1, 7, 4)]
    cache = SimpleKVCache()
    with torch.no_grad():
        ids, cu = pack(sequences)
        logits = llm(ids, cu, kv_cache=cache)[cu[1:].long() - 1]
        # steps of one new token per sequence; in the second, sequence 1 idles (no new row)
        for active in ([0, 1, 2], [0, 2], [0, 1, 2]):
            new = [logits[b].argmax().view(1) if b in active else ids[:0] for b in range(3)]
            sequences = [torch.cat([s, n]) for s, n in zip(sequences, new)]
            step_ids, step_cu = pack(new)
            step = llm(step_ids, step_cu, kv_cache=cache)
            full_ids, full_cu = pack(sequences)
            full = llm(full_ids, full_cu)
            for row, b in enumerate(active):
                assert relative_error(step[row], full[full_cu[b + 1] - 1]) <= 1e-5
            logits = torch.stack([full[full_cu[b + 1] - 1] for b in range(3)])


def test_meta_build_then_init_weights_matches_a_cpu_build():
    with torch.device("meta"):
        llm = LLM(TINY_MOE)
    assert all(t.is_meta for t in [*llm.parameters(), *llm.buffers()])
    assert [name for name, _ in llm.named_buffers()] == ["rotary_cos", "rotary_sin"]  # shared
    llm.to_empty(device="cpu")
    torch.manual_seed(3)
    llm.init_weights()
    reference = LLM(TINY_MOE)
    torch.manual_seed(3)
    reference.init_weights()
    for (name, ours), theirs in zip(llm.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(ours, theirs), name
    assert torch.equal(llm.rotary_cos, reference.rotary_cos)
    assert torch.equal(llm.layers[1].input_layernorm.weight, torch.ones(TINY_MOE.hidden_size))
    assert abs(llm.layers[0].mlp.w1.std().item() - 0.02) < 0.002


def test_moe_losses_are_returned_per_forward(reference_kernels):
    torch.manual_seed(0)
    llm = LLM(TINY_MOE)
    ids, cu = pack([torch.randint(0, 97, (n,)) for n in (6, 10)])
    per_layer = []
    for layer in llm.layers:
        layer.mlp.register_forward_hook(lambda module, args, out: per_layer.append(out[1]))
    hidden, moe = llm.hidden_states(llm.embed_tokens(ids), cu)
    assert hidden.shape == (16, TINY_MOE.hidden_size)
    for field in ("load_balancing_loss", "z_loss"):  # averaged over the layers
        expected = sum(getattr(aux, field) for aux in per_layer) / TINY_MOE.num_layers
        torch.testing.assert_close(getattr(moe, field), expected)
    assert torch.equal(moe.tokens_per_expert[1], per_layer[1].tokens_per_expert)
    assert moe.tokens_per_expert.shape == (TINY_MOE.num_layers, TINY_MOE.num_experts)
    assert moe.tokens_per_expert.sum(1).tolist() == [16 * TINY_MOE.top_k] * TINY_MOE.num_layers
    assert moe.load_balancing_loss.shape == moe.z_loss.shape == ()
    (moe.load_balancing_loss + moe.z_loss).backward()
    assert llm.layers[0].mlp.router.weight.grad.abs().sum() > 0
    assert LLM(TINY_DENSE).hidden_states(torch.zeros(3, 32), cu.clamp(max=3))[1] is None


def test_bad_input_is_refused_by_name():
    llm = LLM(TINY_DENSE)
    cu = torch.tensor([0, 2], dtype=torch.int32)
    with pytest.raises(TypeError, match="input_ids"):
        llm(torch.zeros(2), cu)
    with pytest.raises(ValueError, match="input_ids"):
        llm(torch.tensor([0, 97]), cu)
    with pytest.raises(TypeError, match="cu_seqlens"):
        llm(torch.tensor([0, 1]), cu.long())
    with pytest.raises(ValueError, match="inputs_embeds"):
        llm.hidden_states(torch.zeros(2, 31), cu)
    with pytest.raises(ValueError, match="num_heads"):
        LLM(TINY_DENSE.__class__(num_heads=3, num_kv_heads=2, hidden_size=24))
