"""Tiny random transformers models and packed batches for the integration tests (CPU, seeded).

Parity is judged as DESIGN.md asks: transformers' own model in float64 is the reference, the same
model in float32 (sdpa) gives PyTorch's own error, and ours (float32) may err at most 2x that on
logits and 3x on gradients.
"""
from __future__ import annotations

import copy

import pytest
import torch

from tests.numerics import FORWARD_FACTOR, GRADIENT_FACTOR, assert_within_torch_error

# Every test module here imports this one first: without transformers >= 5 they are skipped.
transformers = pytest.importorskip("transformers", minversion="5.0")

VOCAB = 61
LENGTHS = (5, 13, 1, 9)  # a packed batch: odd lengths and a one-token sample


SHAPE = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1, "max_position_embeddings": 64}


def tiny_llama(seed: int = 0, **overrides):
    """Two layers, GQA (2 query heads over 1 key/value head), head dim 16, fp32, sdpa."""
    config = transformers.LlamaConfig(**{**SHAPE, "intermediate_size": 48, **overrides})
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_mixtral(seed: int = 0, **overrides):
    """As :func:`tiny_llama`, with 4 experts and top-2 routing in each layer."""
    config = transformers.MixtralConfig(**{**SHAPE, "intermediate_size": 40, "num_local_experts": 4,
                                           "num_experts_per_tok": 2, **overrides})
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(config).eval()
    model.set_experts_implementation("eager")  # the loop over experts: grouped_mm has no float64
    return model


def samples(lengths=LENGTHS, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(VOCAB, (n,), generator=gen) for n in lengths]


def packed(tokens: list[torch.Tensor], flash_kwargs: bool = True) -> dict:
    """What ``DataCollatorWithFlattening`` gives the model: ``input_ids``, ``labels`` and
    ``position_ids`` ``[1, T]``, with ``cu_seq_lens_q/k`` and ``max_length_q/k`` if asked."""
    collate = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    return collate([{"input_ids": t.tolist()} for t in tokens])


def with_attention(model, implementation: str, dtype: torch.dtype = torch.float32):
    """A copy of ``model`` in ``dtype`` running attention ``implementation``."""
    other = copy.deepcopy(model).to(dtype)
    other.set_attn_implementation(implementation)
    return other


def logits_and_grads(model, calls: list[dict], weights: torch.Tensor, **forward_kwargs):
    """The logits of every call (``model(**call)``), flattened and concatenated, and every
    parameter's gradient of ``sum(logits * weights)``."""
    model.zero_grad(set_to_none=True)
    logits = torch.cat([model(**call, **forward_kwargs).logits.flatten(0, 1) for call in calls])
    (logits * weights.to(logits.dtype)).sum().backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


def assert_parity(ours: tuple, reference64: tuple, torch32: tuple, what: str) -> None:
    """``(logits, grads)`` of ours within DESIGN.md's tolerance of the float64 reference, measured
    against PyTorch's own float32 error; every parameter's gradient is checked."""
    assert_within_torch_error(ours[0], reference64[0], torch32[0], FORWARD_FACTOR,
                              f"{what}: logits")
    assert ours[1].keys() == reference64[1].keys()
    for name, grad in ours[1].items():
        assert grad is not None, f"{what}: {name} got no gradient"
        assert_within_torch_error(grad, reference64[1][name], torch32[1][name], GRADIENT_FACTOR,
                                  f"{what}: gradient of {name}")
