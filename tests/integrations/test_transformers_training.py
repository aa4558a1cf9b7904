"""A few AdamW steps on batches packed by transformers' DataCollatorWithFlattening, with
attn_implementation="sphinx_varlen" (and use_sphinx_moe, the load-balancing loss included, for
Mixtral), give the losses of transformers' sdpa on the same samples padded: within DESIGN.md's
tolerance of the same training in float64, measured against PyTorch's own float32 error."""
from __future__ import annotations

import pytest
import torch

from sphinx_kernels.integrations import transformers as skt
from tests.integrations.tiny_hf import packed, samples, tiny_llama, tiny_mixtral, with_attention
from tests.numerics import FORWARD_FACTOR, assert_within_torch_error

STEPS = [(7, 1, 12, 4), (16, 3, 9), (5, 11, 2, 8, 6)]  # sample lengths of each step's batch


@pytest.fixture(scope="module", autouse=True)
def registered():
    skt.register()


def padded(tokens: list[torch.Tensor]) -> dict:
    """The samples right-padded to the longest: padding masked out and never a label."""
    longest = max(len(t) for t in tokens)
    ids = torch.zeros(len(tokens), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, t in enumerate(tokens):
        ids[row, :len(t)], mask[row, :len(t)] = t, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def train(model, batches: list[dict]) -> torch.Tensor:
    """The loss of each step (transformers' own: mean next-token cross entropy, plus
    ``router_aux_loss_coef`` times the load-balancing loss for Mixtral)."""
    optimizer = torch.optim.AdamW(model.train().parameters(), lr=1e-2)
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_losses_match_sdpa_on_padded_batches(family, reference_ops):
    if family == "llama":
        model = tiny_llama()
    else:
        model = tiny_mixtral(output_router_logits=True, router_aux_loss_coef=0.1)
    steps = [samples(lengths, seed=i) for i, lengths in enumerate(STEPS)]
    ours = with_attention(model, "sphinx_varlen")
    if family == "mixtral":
        skt.use_sphinx_moe(ours, block_size=4)
    losses = train(ours, [packed(tokens) for tokens in steps])
    reference = train(with_attention(model, "sdpa", torch.float64), [padded(t) for t in steps])
    torch32 = train(with_attention(model, "sdpa"), [padded(tokens) for tokens in steps])
    assert_within_torch_error(losses, reference, torch32, FORWARD_FACTOR, f"{family} losses")
