"""use_sphinx_moe on transformers' own Mixtral: the logits, the load-balancing loss transformers
computes from the recorded router logits, and every parameter's gradient equal the unmodified
model's (DESIGN.md's tolerance against float64); the state dict keeps transformers' layout, so
save_pretrained writes a standard checkpoint that plain transformers loads; undo, router jitter,
frozen parameters, and output recording set up before the swap."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from sphinx_kernels.integrations import transformers as skt
from tests.integrations.tiny_hf import VOCAB, tiny_llama, tiny_mixtral, transformers
from tests.numerics import FORWARD_FACTOR, GRADIENT_FACTOR, assert_within_torch_error

BLOCK_SIZE = 4  # MoEMLP's rows per expert block: small, for CPU sizes


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(VOCAB, (2, 11), generator=torch.Generator().manual_seed(seed))


def sphinx_copy(model):
    return skt.use_sphinx_moe(copy.deepcopy(model), block_size=BLOCK_SIZE)


def grads_in_transformers_layout(model) -> dict[str, torch.Tensor]:
    """Every parameter's gradient under transformers' names; a SphinxMixtralSparseMoe's four
    joined the way its state dict joins its weights."""
    grads = {name: p.grad for name, p in model.named_parameters()}
    for prefix, module in model.named_modules():
        if isinstance(module, skt.SphinxMixtralSparseMoe):
            ours = {k: grads.pop(f"{prefix}.moe.{k}") for k in ("router.weight", "w1", "w3", "w2")}
            grads[f"{prefix}.gate.weight"] = ours["router.weight"]
            grads[f"{prefix}.experts.gate_up_proj"] = torch.cat([ours["w1"], ours["w3"]], dim=1)
            grads[f"{prefix}.experts.down_proj"] = ours["w2"]
    return grads


def logits_aux_grads(model, ids, weights):
    """Logits, the auxiliary loss and the gradients of ``sum(logits * weights) + aux_loss``."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, output_router_logits=True)
    ((out.logits * weights.to(out.logits.dtype)).sum() + out.aux_loss).backward()
    return out.logits.detach(), out.aux_loss.detach(), grads_in_transformers_layout(model)


def test_logits_aux_loss_and_gradients_match_transformers():
    model = tiny_mixtral(num_hidden_layers=1)  # the kernels run in the Triton interpreter here
    ids = tokens()
    weights = torch.randn(*ids.shape, VOCAB, generator=torch.Generator().manual_seed(1))
    ours = logits_aux_grads(sphinx_copy(model), ids, weights)
    reference = logits_aux_grads(copy.deepcopy(model).double(), ids, weights)
    torch32 = logits_aux_grads(model, ids, weights)
    assert_within_torch_error(ours[0], reference[0], torch32[0], FORWARD_FACTOR, "logits")
    assert_within_torch_error(ours[1], reference[1], torch32[1], FORWARD_FACTOR, "aux_loss")
    assert ours[2].keys() == reference[2].keys()
    for name, grad in ours[2].items():
        assert_within_torch_error(grad, reference[2][name], torch32[2][name], GRADIENT_FACTOR,
                                  f"gradient of {name}")


def perturbed(model):
    """``model`` with every parameter moved, so that stale copies of the weights would show."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    return model


def assert_same_state(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def test_save_pretrained_writes_a_standard_checkpoint(tmp_path, reference_ops):
    ours = perturbed(sphinx_copy(tiny_mixtral()))
    ours.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys  # Mixtral's own keys
    assert not any(".moe." in key for key in keys)
    plain = transformers.MixtralForCausalLM.from_pretrained(tmp_path)
    assert not any(isinstance(m, skt.SphinxMixtralSparseMoe) for m in plain.modules())
    assert_same_state(plain.state_dict(), ours.state_dict())
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, ours(input_ids=ids).logits)


def test_load_state_dict_takes_transformers_layout(reference_ops):
    ours, other = sphinx_copy(tiny_mixtral()), tiny_mixtral(seed=1)
    ours.load_state_dict(other.state_dict())
    assert_same_state(ours.state_dict(), other.state_dict())
    ours.load_state_dict(ours.state_dict())  # and its own


def test_undo_gives_transformers_blocks_with_the_current_weights(reference_ops):
    ours = perturbed(sphinx_copy(tiny_mixtral()))
    state = ours.state_dict()
    skt.undo_sphinx_moe(ours)
    blocks = [layer.mlp for layer in ours.model.layers]
    assert all(type(b).__name__ == "MixtralSparseMoeBlock" for b in blocks)
    assert_same_state(ours.state_dict(), state)


def test_router_logits_recorded_when_transformers_hooked_the_model_first(reference_ops):
    model = tiny_mixtral()
    ids = tokens()
    expected = model(input_ids=ids, output_router_logits=True).aux_loss  # installs the hooks
    ours = skt.use_sphinx_moe(model, block_size=BLOCK_SIZE)
    out = ours(input_ids=ids, output_router_logits=True)
    assert len(out.router_logits) == ours.config.num_hidden_layers
    torch.testing.assert_close(out.aux_loss, expected)
    skt.undo_sphinx_moe(ours)
    assert len(ours(input_ids=ids, output_router_logits=True).router_logits) == 2


def test_router_jitter_noise_drawn_as_transformers_draws_it(reference_ops):
    model = tiny_mixtral(router_jitter_noise=0.2).train()
    ours = sphinx_copy(model)
    ids = tokens()
    logits = []
    for m in (model, ours):
        torch.manual_seed(7)
        logits.append(m(input_ids=ids).logits)
    torch.testing.assert_close(logits[1], logits[0])
    with torch.no_grad():  # and in eval there is no noise
        torch.testing.assert_close(ours.eval()(input_ids=ids).logits,
                                   model.eval()(input_ids=ids).logits)


def test_frozen_parameters_stay_frozen():
    model = tiny_mixtral()
    model.model.layers[0].mlp.gate.weight.requires_grad_(False)
    model.model.layers[1].mlp.experts.gate_up_proj.requires_grad_(False)
    ours = sphinx_copy(model)
    frozen = {name for name, p in ours.named_parameters() if not p.requires_grad}
    assert frozen == {"model.layers.0.mlp.moe.router.weight", "model.layers.1.mlp.moe.w1",
                      "model.layers.1.mlp.moe.w3"}


def test_models_it_cannot_serve_are_refused():
    with pytest.raises(ValueError, match="no Mixtral sparse-MoE block"):
        skt.use_sphinx_moe(tiny_llama())
    with pytest.raises(ValueError, match="hidden_act is 'gelu'"):
        skt.use_sphinx_moe(tiny_mixtral(hidden_act="gelu"))
