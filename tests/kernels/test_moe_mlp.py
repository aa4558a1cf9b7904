"""sphinx_kernels.nn.MoEMLP: output, auxiliary losses and the gradients of x, the router and the
three expert weights against a float64 loop over tokens written on the Hugging Face Mixtral state
dict (so the conversion is checked too), within the tolerance rule (docs/numerics.md; PyTorch's own
error: the Hugging Face block in the low dtype); any leading shape; the conversion round trip;
torch.compile(fullgraph=True) of the layer and of the routing chain on every backend; FSDP2."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

import sphinx_kernels
from sphinx_kernels.backends import ENV_BACKEND
from sphinx_kernels.nn import MoEMLP, moe_mlp_from_mixtral, moe_mlp_to_mixtral
from sphinx_kernels.ops.topk_gating import TOPK_GATING_BACKENDS, topk_gating, topk_gating_reference
from tests.kernels.moe_cases import DEVICE
from tests.numerics import FORWARD_FACTOR, GRADIENT_FACTOR, assert_all_within_torch_error

PREFIX = "model.layers.3."
# "kernels": each op's first backend here (cpp routing, Triton for the rest under the interpreter);
# "reference": every op forced to its pure-PyTorch reference.
BACKENDS = ["kernels", "reference"]
# (T, E, k, H, F, block_size, dtype): a sample of the acceptance grid (see test_moe_expert_mlp.py).
CONFIGS = [
    (1, 1, 1, 48, 100, 16, torch.float16),
    (7, 2, 1, 96, 200, 32, torch.float16),
    (97, 8, 4, 48, 100, 16, torch.float32),
    (300, 8, 2, 96, 200, 32, torch.float32),
]
LOSS_WEIGHTS = (0.7, 0.3)  # of the load-balancing loss and the z-loss in the checked objective


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.setenv(ENV_BACKEND, "reference")
    else:
        monkeypatch.delenv(ENV_BACKEND, raising=False)
    return request.param


def make_module(num_experts, k, hidden, ffn, block_size, dtype, gen):
    module = MoEMLP(hidden, ffn, num_experts, k, block_size=block_size)
    with torch.no_grad():  # float64 draws rounded once to the test dtype
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / p.shape[-1] ** 0.5)
    return module.to(dtype=dtype, device=DEVICE)


def mixtral_block(x, state, k, chosen, *, per_token):
    """Mixtral's sparse MoE block on Hugging Face keys: softmax of the router logits in float32
    (float64 for float64), top-k renormalised, gates in x's dtype, each chosen expert's SwiGLU MLP.
    ``chosen`` ``[T, k]`` fixes the experts (a discrete choice that float64 and float16 logits may
    break differently on near-ties). Returns ``(y, lb_loss, z_loss)``.

    ``per_token``: a loop over tokens (the float64 oracle, independent of any grouping); else the
    Hugging Face loop over experts (``index_add_`` of each expert's batched rows), which is what
    PyTorch itself computes in a low dtype: its error is the baseline. (On the CPU a per-token loop
    in float32 runs matrix-vector products, which are about twice as accurate as the batched
    products every real MoE layer uses, so it would understate PyTorch's own error.)"""
    block = PREFIX + "block_sparse_moe."
    logits = x @ state[block + "gate.weight"].T
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    probs = torch.softmax(logits.to(acc), dim=-1)
    gates = probs.gather(1, chosen)
    gates = (gates / gates.sum(-1, keepdim=True)).to(x.dtype)

    def expert(e, rows):
        w = {name: state[f"{block}experts.{e}.{name}.weight"] for name in ("w1", "w2", "w3")}
        return (torch.nn.functional.silu(rows @ w["w1"].T) * (rows @ w["w3"].T)) @ w["w2"].T

    num_tokens, num_experts = logits.shape
    if per_token:
        y = torch.stack([sum(gates[t, j] * expert(e, x[t])
                             for j, e in enumerate(chosen[t].tolist()))
                         for t in range(num_tokens)]) if num_tokens else torch.zeros_like(x)
    else:
        y = torch.zeros_like(x)
        for e in range(num_experts):
            token, slot = torch.nonzero(chosen == e, as_tuple=True)
            if token.numel():
                y = y.index_add(0, token, expert(e, x[token]) * gates[token, slot, None])
    fraction = torch.bincount(chosen.reshape(-1), minlength=num_experts).to(acc) / (num_tokens * k)
    lb_loss = num_experts * (fraction * probs.mean(0)).sum()
    z_loss = (torch.logsumexp(logits.to(acc), dim=-1) ** 2).mean()
    return y, lb_loss, z_loss


def loop_outputs_and_grads(x, state, k, chosen, grad_y, dtype, per_token=False):
    """The block's (y, lb, z), the gradient of x and those of every parameter (``MoEMLP`` names), in
    ``dtype`` (``per_token``: the oracle's loop over tokens)."""
    x = x.detach().to(dtype).requires_grad_(True)
    state = {key: v.detach().to(dtype).requires_grad_(True) for key, v in state.items()}
    y, lb_loss, z_loss = mixtral_block(x, state, k, chosen, per_token=per_token)
    loss = (y * grad_y.to(dtype)).sum() + LOSS_WEIGHTS[0] * lb_loss + LOSS_WEIGHTS[1] * z_loss
    loss.backward()
    grads = {key: v.grad if v.grad is not None else torch.zeros_like(v) for key, v in state.items()}
    return (y.detach(), lb_loss.detach(), z_loss.detach()), x.grad, moe_mlp_from_mixtral(grads,
                                                                                          PREFIX)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "T{}-E{}-k{}-H{}-F{}-b{}-{}".format(
    *c[:6], str(c[6]).removeprefix("torch.")))
def test_moe_mlp_matches_a_float64_loop_over_tokens(backend, config, seed):
    num_tokens, num_experts, k, hidden, ffn, block_size, dtype = config
    gen = torch.Generator().manual_seed(seed)
    module = make_module(num_experts, k, hidden, ffn, block_size, dtype, gen)
    x, grad_y = random_tokens(num_tokens, hidden, dtype, gen)
    check_module_against_loop(module, x, grad_y, backend, gen)


def test_all_tokens_to_one_expert(backend, seed):
    """A constant input feature and a router that favours expert 5 on it: every token, k = 1."""
    gen = torch.Generator().manual_seed(seed)
    module = make_module(8, 1, 48, 100, 16, torch.float32, gen)
    with torch.no_grad():
        module.router.weight[:, 0] = -2.0
        module.router.weight[5, 0] = 2.0

    def tokens(g):
        x, grad_y = random_tokens(97, 48, torch.float32, g)
        x[:, 0] = 4.0
        return x, grad_y

    aux = check_module_against_loop(module, *tokens(gen), backend, gen, tokens)
    assert aux.tokens_per_expert.tolist() == [0] * 5 + [97, 0, 0]


def random_tokens(num_tokens, hidden, dtype, gen):
    """Tokens ``[T, H]`` in ``dtype`` and a float64 output gradient."""
    x = torch.randn(num_tokens, hidden, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    grad_y = torch.randn(num_tokens, hidden, generator=gen, dtype=torch.float64).to(DEVICE)
    return x, grad_y


def loop_pairs(module, x, grad_y, oracle=False):
    """(same dtype, float64) pairs of the Hugging Face block's y, grad of x and parameter gradients
    (the experts the module's router chooses), and the float64 losses. ``oracle``: the float64 side
    is the loop over tokens, independent of any grouping (what the module is checked against); else
    the block in float64, which measures PyTorch's error as well and costs far less."""
    k = module.top_k
    chosen = topk_gating_reference(module.router(x.detach()).detach(), k).expert_ids.long()
    state = moe_mlp_to_mixtral(module.state_dict(), PREFIX)
    exact = loop_outputs_and_grads(x, state, k, chosen, grad_y, torch.float64, per_token=oracle)
    same = loop_outputs_and_grads(x, state, k, chosen, grad_y, x.dtype)

    def checked(results):
        (y, _, _), grad_x, grads = results
        return [y, grad_x] + [grads[name] for name in PARAMETERS]

    return list(zip(checked(same), checked(exact))), exact[0][1:], chosen


PARAMETERS = ("router.weight", "w1", "w3", "w2")


def check_module_against_loop(module, x, grad_y, backend, gen, tokens=None):
    """Output and gradients of ``module`` against the float64 loop over tokens, judged by the
    Hugging Face block's own error in x's dtype over fresh tokens (``tokens(generator)``)."""
    x = x.detach().requires_grad_(True)
    y, aux = module(x)
    loss = ((y * grad_y.to(y.dtype)).sum() + LOSS_WEIGHTS[0] * aux.load_balancing_loss
            + LOSS_WEIGHTS[1] * aux.z_loss)
    module.zero_grad()
    loss.backward()
    first, (lb_loss, z_loss), chosen = loop_pairs(module, x, grad_y, oracle=True)
    # The experts the module chose are its router's top k (the op tests check that every backend
    # chooses exactly as the reference does).
    assert torch.equal(aux.tokens_per_expert.long(),
                       torch.bincount(chosen.reshape(-1), minlength=module.num_experts))
    assert y.dtype == x.dtype and y.shape == x.shape
    # The losses are the gating op's, passed through (the gating tests hold them to the float64
    # reference): the same bits, and close to the float64 loop (whose logits are not rounded).
    gating = topk_gating(module.router(x.detach()), module.top_k)
    rtol = 16 * torch.finfo(x.dtype).eps
    for name, got, exact in (("load_balancing_loss", aux.load_balancing_loss, lb_loss),
                             ("z_loss", aux.z_loss, z_loss)):
        assert torch.equal(got, getattr(gating, name)), name
        torch.testing.assert_close(got.double(), exact, rtol=rtol, atol=0, msg=name)
    params = dict(module.named_parameters())
    tokens = tokens or (lambda g: random_tokens(x.shape[0], x.shape[1], x.dtype, g))
    assert_all_within_torch_error(
        [y.detach(), x.grad] + [params[name].grad for name in PARAMETERS],
        [exact for _, exact in first], lambda g: loop_pairs(module, *tokens(g))[0], gen,
        [FORWARD_FACTOR] + [GRADIENT_FACTOR] * 5, ["y", "grad x"] + [f"grad {name}" for name in
                                                                     PARAMETERS],
        backend, first=first)
    return aux


def test_any_leading_shape_and_plain_parameters():
    gen = torch.Generator().manual_seed(3)
    module = make_module(4, 2, 48, 100, 16, torch.float32, gen)
    x = torch.randn(3, 5, 48, generator=gen).to(DEVICE)
    y, aux = module(x)
    flat, _ = module(x.reshape(15, 48))
    assert y.shape == x.shape and torch.equal(y.reshape(15, 48), flat)
    assert int(aux.tokens_per_expert.sum()) == 15 * 2
    # FSDP2 shards plain parameters: no subclass, no shared storage between them.
    params = dict(module.named_parameters())
    assert sorted(params) == ["router.weight", "w1", "w2", "w3"]
    assert all(type(p) is torch.nn.Parameter for p in params.values())
    assert len({p.untyped_storage().data_ptr() for p in params.values()}) == 4


def test_mixtral_state_dict_round_trip():
    gen = torch.Generator().manual_seed(4)
    module = make_module(3, 2, 8, 12, 16, torch.float32, gen)
    hf = moe_mlp_to_mixtral(module.state_dict(), "model.layers.0.")
    assert sorted(hf) == sorted(
        ["model.layers.0.block_sparse_moe.gate.weight"]
        + [f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"
           for e in range(3) for w in ("w1", "w2", "w3")])
    assert hf["model.layers.0.block_sparse_moe.experts.1.w2.weight"].shape == (8, 12)  # [H, F]
    assert torch.equal(hf["model.layers.0.block_sparse_moe.experts.2.w1.weight"], module.w1[2])
    back = moe_mlp_from_mixtral({k: v.clone() for k, v in hf.items()}, "model.layers.0.")
    fresh = MoEMLP(8, 12, 3, 2)
    fresh.load_state_dict(back)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 module.state_dict().values()))
    with pytest.raises(KeyError, match="is prefix 'model.layers.1.' right"):
        moe_mlp_from_mixtral(hf, "model.layers.1.")


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"top_k must be in \[1, num_experts\] = \[1, 4\]"):
        MoEMLP(8, 12, 4, 5)
    with pytest.raises(ValueError, match="x must have last dimension hidden = 8"):
        MoEMLP(8, 12, 4, 2)(torch.randn(3, 9))


def test_compiles_with_fullgraph_forward_and_backward():
    gen = torch.Generator().manual_seed(11)
    eager = make_module(4, 2, 48, 100, 16, torch.float32, gen)
    compiled = make_module(4, 2, 48, 100, 16, torch.float32, gen)
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(61, 48, generator=gen).to(DEVICE)

    def loss_of(module):
        y, aux = module(x)
        return y.square().sum() + aux.load_balancing_loss + 1e-3 * aux.z_loss

    loss_of(eager).backward()
    loss_of(torch.compile(compiled, fullgraph=True)).backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5, msg=name)


def moe_layer(x, router, expert_scale, backend):
    """Gating -> routing -> permute -> a stand-in expert (row scale by owning expert) ->
    unpermute."""
    gating = sphinx_kernels.topk_gating(x @ router, 2, backend=backend)
    plan = sphinx_kernels.moe_routing(gating.expert_ids, router.shape[1], block_size=16,
                                      backend=backend)
    grouped = sphinx_kernels.moe_permute(x, plan, backend=backend)
    row_expert = torch.searchsorted(plan.padded_offsets[1:],
                                    torch.arange(grouped.shape[0], device=x.device), right=True)
    expert_out = grouped * expert_scale[row_expert.clamp(max=router.shape[1] - 1)][:, None]
    out = sphinx_kernels.moe_unpermute(expert_out, plan, gating.weights, backend=backend)
    return out.square().sum() + gating.load_balancing_loss + 1e-3 * gating.z_loss


@pytest.mark.parametrize("backend", TOPK_GATING_BACKENDS.available(
    TOPK_GATING_BACKENDS.request(DEVICE, torch.float32)))
def test_routing_chain_compiles_with_fullgraph_on_every_backend(backend):
    gen = torch.Generator().manual_seed(11)
    inputs = [torch.randn(61, 16, generator=gen), torch.randn(16, 8, generator=gen),
              torch.rand(8, generator=gen)]
    eager_inputs = [t.to(DEVICE).requires_grad_(True) for t in inputs]
    compiled_inputs = [t.to(DEVICE).requires_grad_(True) for t in inputs]
    moe_layer(*eager_inputs, backend).backward()
    torch.compile(moe_layer, fullgraph=True)(*compiled_inputs, backend).backward()
    for eager, compiled in zip(eager_inputs, compiled_inputs):
        torch.testing.assert_close(compiled.grad, eager.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_fsdp2_shards_the_layer_unchanged():
    """fully_shard on a one-process gloo group: parameters become DTensors, the ops take the
    gathered tensors, and output and gradients equal the unsharded layer's bit for bit."""
    from torch.distributed.fsdp import fully_shard

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        gen = torch.Generator().manual_seed(5)
        plain = make_module(4, 2, 48, 100, 16, torch.float32, gen).cpu()
        sharded = MoEMLP(48, 100, 4, 2, block_size=16)
        sharded.load_state_dict(plain.state_dict())
        fully_shard(sharded)
        x = torch.randn(33, 48, generator=gen)
        results = []
        for module in (plain, sharded):
            y, aux = module(x)
            (y.square().sum() + aux.load_balancing_loss).backward()
            results.append((y.detach(), [p.grad for p in module.parameters()]))
        assert torch.equal(results[0][0], results[1][0])
        for a, b in zip(results[0][1], results[1][1]):
            assert torch.equal(a, b.full_tensor())
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_gpu_bf16_layer_at_mixtral_size():
    """The whole layer (cuda routing, Triton gating, permutations and expert GEMMs) in bf16 at
    Mixtral-8x7B sizes (H = 4096, F = 14336, E = 8, k = 2, 4096 tokens) against the Hugging Face
    block in float32 (no TF32), judged by that block's own bf16 error."""
    gen = torch.Generator().manual_seed(0)
    module = make_module(8, 2, 4096, 14336, 128, torch.bfloat16, gen)
    check_module_against_loop(module, *random_tokens(4096, 4096, torch.bfloat16, gen), "kernels",
                              gen)
