"""attn_implementation="sphinx_varlen" inside transformers' own Llama, Mixtral and Mistral: a packed
batch (however its sequences are described) gives the logits and every parameter gradient of
transformers' sdpa run per sample, within DESIGN.md's tolerance; unpadded rows, one plain sequence
and generation with a KV cache are served; what cannot be served exactly is refused by name."""
from __future__ import annotations

import pytest
import torch

from sphinx_kernels.integrations import transformers as skt
from tests.integrations.tiny_hf import (
    LENGTHS,
    VOCAB,
    assert_parity,
    logits_and_grads,
    packed,
    samples,
    tiny_llama,
    tiny_mixtral,
    transformers,
    with_attention,
)
from tests.numerics import FORWARD_FACTOR, assert_within_torch_error

MODELS = {"llama": tiny_llama, "mixtral": tiny_mixtral}


@pytest.fixture(scope="module", autouse=True)
def registered():
    skt.register()


def loss_weights(rows: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))


def check_against_sdpa(model, ours_calls: list[dict], per_sample: list[dict], what: str) -> None:
    """``ours_calls`` with sphinx_varlen (float32) against ``per_sample`` with sdpa (float64, and
    float32 for PyTorch's own error): logits and every parameter gradient."""
    rows = sum(call["input_ids"].numel() for call in per_sample)
    weights = loss_weights(rows)
    ours = logits_and_grads(with_attention(model, "sphinx_varlen"), ours_calls, weights)
    reference = logits_and_grads(with_attention(model, "sdpa", torch.float64), per_sample, weights)
    torch32 = logits_and_grads(with_attention(model, "sdpa"), per_sample, weights)
    assert_parity(ours, reference, torch32, what)


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("described_by", ["cu_seq_lens", "position_ids"])
def test_packed_batch_matches_sdpa_per_sample(family, described_by, request):
    # The kernels (the Triton interpreter here: seconds per step) read the strided views of
    # transformers' tensors in one case; the others check which sequences are attended.
    if (family, described_by) != ("llama", "cu_seq_lens"):
        request.getfixturevalue("reference_ops")
    tokens = samples()
    batch = packed(tokens, flash_kwargs=described_by == "cu_seq_lens")
    del batch["labels"]
    assert ("cu_seq_lens_q" in batch) == (described_by == "cu_seq_lens")
    check_against_sdpa(MODELS[family](), [batch], [{"input_ids": t[None]} for t in tokens],
                       f"{family} packed, sequences from {described_by}")


@pytest.mark.parametrize("rows, length, mask", [(1, 9, False), (3, 7, True)])
def test_unpadded_rows_are_one_sequence_each(rows, length, mask, reference_ops):
    """A plain batch (no packing, no padding; an all-ones mask is no padding) is served row by
    row, and so is one single sequence."""
    ids = torch.randint(VOCAB, (rows, length), generator=torch.Generator().manual_seed(2))
    call = {"input_ids": ids}
    if mask:
        call["attention_mask"] = torch.ones_like(ids)
    check_against_sdpa(tiny_llama(), [call], [{"input_ids": row[None]} for row in ids],
                       f"{rows} rows of {length}")


def test_generation_with_a_kv_cache_matches_sdpa(reference_ops):
    """Prefill, then new tokens against the cache (queries aligned to the end of their keys)."""
    model = tiny_llama()
    prompt = torch.randint(VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    runs = {}
    for name in ("sphinx_varlen", "sdpa"):
        runs[name] = with_attention(model, name).generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
            output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(runs["sphinx_varlen"].sequences, runs["sdpa"].sequences)
    for ours, theirs in zip(runs["sphinx_varlen"].logits, runs["sdpa"].logits):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_from_pretrained_with_sphinx_varlen(tmp_path, reference_ops):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="sphinx_varlen")
    assert loaded.config._attn_implementation == "sphinx_varlen"
    batch = packed(samples())
    del batch["labels"]
    with torch.no_grad():
        expected = with_attention(model, "sphinx_varlen")(**batch).logits
        assert torch.equal(loaded(**batch).logits, expected)


def test_padded_batch_is_refused():
    ids = torch.randint(VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    model = with_attention(tiny_llama(), "sphinx_varlen")
    with pytest.raises(ValueError, match="padding-free batches and got an attention mask"):
        model(input_ids=ids, attention_mask=mask)


def test_attention_dropout_in_training_is_refused(reference_ops):
    model = with_attention(tiny_llama(attention_dropout=0.1), "sphinx_varlen")
    batch = packed(samples())
    del batch["labels"]
    model(**batch)  # in eval transformers passes no dropout
    with pytest.raises(ValueError, match="attention_dropout=0.1"):
        model.train()(**batch)


def test_attention_weights_are_refused(reference_ops):
    model = with_attention(tiny_llama(), "sphinx_varlen")
    with pytest.raises(ValueError, match="output_attentions=True"):
        model(input_ids=torch.randint(VOCAB, (1, 5)), output_attentions=True)


def tiny_mistral(sliding_window: int):
    config = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        sliding_window=sliding_window)
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(config).eval()


def test_sliding_window_served_only_when_every_sequence_fits(reference_ops):
    tokens = samples()
    batch = packed(tokens)
    del batch["labels"]
    longest = max(LENGTHS)
    with pytest.raises(ValueError, match=f"sliding_window={longest - 1}"):
        with_attention(tiny_mistral(longest - 1), "sphinx_varlen")(**batch)
    model = tiny_mistral(longest)
    with torch.no_grad():
        ours = with_attention(model, "sphinx_varlen")(**batch).logits[0]
        per_sample = [{"input_ids": t[None]} for t in tokens]
        reference, torch32 = (
            torch.cat([m(**call).logits[0] for call in per_sample])
            for m in (with_attention(model, "sdpa", torch.float64), with_attention(model, "sdpa")))
    assert_within_torch_error(ours, reference, torch32, FORWARD_FACTOR, "mistral logits")


class Layer(torch.nn.Module):
    is_causal = True


@pytest.mark.parametrize("kwargs, named", [
    ({"attention_mask": torch.zeros(1, 1, 5, 5)}, "got an attention mask"),
    ({"softcap": 30.0}, "softcap"),
    ({"s_aux": torch.zeros(4)}, "s_aux"),
    ({"position_bias": torch.zeros(1, 4, 5, 5)}, "position_bias"),
    ({"output_attentions": True}, "output_attentions"),
    ({"value": torch.zeros(1, 2, 5, 4)}, "value head dim"),
    ({"cu_seq_lens_k": torch.tensor([0, 5], dtype=torch.int32)}, "cu_seq_lens_k"),
    ({"position_ids": torch.arange(4)[None]}, "position_ids"),
])
def test_unsupported_inputs_are_named(kwargs, named):
    args = {"query": torch.zeros(1, 4, 5, 8), "key": torch.zeros(1, 2, 5, 8),
            "value": torch.zeros(1, 2, 5, 8), "attention_mask": None}
    args.update(kwargs)
    with pytest.raises(ValueError, match=named):
        skt.sphinx_varlen_attention(Layer(), **args)


@pytest.mark.gpu
def test_packed_kwargs_need_no_host_sync():
    """With cu_seq_lens and max_length, the attention function never waits for the GPU."""
    q = torch.randn(1, 4, 28, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 28, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cu = torch.tensor([0, 5, 18, 19, 28], dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, weights = skt.sphinx_varlen_attention(Layer(), q, k, v, None, cu_seq_lens_q=cu,
                                                   cu_seq_lens_k=cu, max_length_q=13,
                                                   max_length_k=13)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (1, 28, 4, 64) and weights is None
