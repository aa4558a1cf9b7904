"""nn.VarlenSelfAttention against a float64 Llama attention evaluated per sequence with
transformers' own functions (``apply_rotary_pos_emb``, ``repeat_kv``) around a causal (or prefix-LM)
softmax, within the tolerance rule (docs/numerics.md), on the kernel backends and the reference;
padding rows; Llama parameter names; meta-device build; compile."""
from __future__ import annotations

import math
import random

import pytest
import torch

from sphinx_kernels.nn import VarlenSelfAttention, rotary_tables
from sphinx_kernels.ops.varlen_attention import VARLEN_ATTENTION_BACKENDS
from tests.numerics import FORWARD_FACTOR, GRADIENT_FACTOR, assert_all_within_torch_error

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 48, 4, 2, 16


def kernel_backends():
    """Backend pairs (attention, rotary) to run the module on: the kernels where they run here, and
    the references."""
    request = VARLEN_ATTENTION_BACKENDS.request(DEVICE, torch.float32, head_dim=HEAD_DIM,
                                                max_seqlen=False)
    attention = [b.name for b in VARLEN_ATTENTION_BACKENDS.backends
                 if b.name in ("triton", "reference") and not b.not_supported_reasons(request)]
    return [(name, "triton" if name == "triton" else "reference") for name in attention]


def packed_batch(lengths, padding, gen):
    cu = torch.tensor([0] + list(lengths)).cumsum(0).to(torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths]
                          + [torch.zeros(padding, dtype=torch.long)])
    x = torch.randn(int(cu[-1]) + padding, HIDDEN, generator=gen, dtype=torch.float64)
    return x.to(DEVICE), cu.to(DEVICE), positions.to(DEVICE)


def llama_attention(module, x, cu, positions, prefix_lens=None, dtype=torch.float64):
    """The module's function evaluated in ``dtype`` with transformers' Llama functions, one sequence
    at a time."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama",
                                reason="transformers (the test extra) is the Llama oracle")
    weights = {n: p.to(dtype) for n, p in module.named_parameters()}  # gradients reach the module
    cos, sin = (t.to(dtype) for t in rotary_tables(positions.max().item() + 1, HEAD_DIM,
                                                  device=x.device))
    x = x.to(dtype)
    # Projections over all packed rows at once, as the module does (the same GEMMs, so the
    # comparison isolates rotary and attention); attention one sequence at a time, as [1, H, L, D].
    linear = torch.nn.functional.linear
    heads = {name: linear(x, weights[f"{name}_proj.weight"]).view(x.shape[0], -1, HEAD_DIM)
             for name in "qkv"}
    attended = torch.zeros(x.shape[0], HEADS * HEAD_DIM, dtype=dtype, device=x.device)
    offsets = cu.tolist()
    for b in range(len(offsets) - 1):
        rows = slice(offsets[b], offsets[b + 1])
        n, pos = offsets[b + 1] - offsets[b], positions[rows]
        q, k, v = (heads[name][rows].transpose(0, 1)[None] for name in "qkv")
        q, k = llama.apply_rotary_pos_emb(q, k, cos[pos][None], sin[pos][None])
        k, v = (llama.repeat_kv(t, HEADS // KV_HEADS) for t in (k, v))
        scores = (q @ k.transpose(2, 3))[0] / math.sqrt(HEAD_DIM)
        visible = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        if prefix_lens is not None:
            p = int(prefix_lens[b])
            visible[:p, :p] = True
        scores = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        attended[rows] = (scores @ v[0]).transpose(0, 1).reshape(n, HEADS * HEAD_DIM)
    return linear(attended, weights["o_proj.weight"])


def oracle_pairs(module, x64, cu, positions, prefix_lens, grad, dtype):
    """(``dtype``, float64) pairs of the Llama attention's output, grad of x and parameter gradients
    (the module's parameters as they are, in both)."""
    results = []
    for run_dtype in (dtype, torch.float64):
        ref = VarlenSelfAttention(HIDDEN, HEADS, KV_HEADS, HEAD_DIM,
                                  max_position_embeddings=64).to(DEVICE)
        ref.load_state_dict(module.state_dict())
        ref = ref.to(run_dtype)
        xr = x64.to(run_dtype, copy=True).requires_grad_()
        y = llama_attention(ref, xr, cu, positions, prefix_lens, dtype=run_dtype)
        y.backward(grad.to(run_dtype))
        results.append([y.detach(), xr.grad] + [p.grad for _, p in ref.named_parameters()])
    return list(zip(*results))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backends", kernel_backends(), ids=lambda b: b[0])
@pytest.mark.parametrize("prefix", [False, True])
def test_output_and_gradients_within_tolerance(backends, dtype, prefix, monkeypatch, seed):
    attention, rotary = backends
    monkeypatch.setenv("SPHINX_KERNELS_BACKEND",
                       f"varlen_attention={attention},apply_rotary={rotary}")
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    # At least one sequence of several tokens: with only 0- and 1-token sequences the q and k
    # gradients are exactly 0 and the rule would allow no rounding at all.
    lengths = [rng.choice((0, 1, 7, 30)) for _ in range(rng.randint(0, 3))] + [rng.choice((7, 30))]
    rng.shuffle(lengths)
    x64, cu, positions = packed_batch(lengths, padding=3, gen=gen)
    prefix_lens = (torch.tensor([rng.randint(0, n) for n in lengths], dtype=torch.int32,
                                device=DEVICE) if prefix else None)
    module = VarlenSelfAttention(HIDDEN, HEADS, KV_HEADS, HEAD_DIM,
                                 max_position_embeddings=64).to(DEVICE)
    torch.nn.init.normal_(module.o_proj.weight, std=0.2, generator=gen)
    low = module.to(dtype)
    x = x64.to(dtype).requires_grad_()
    out = low(x, cu, positions, prefix_lens=prefix_lens)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    out.backward(grad.to(dtype))
    padding = slice(int(cu[-1]), None)
    assert torch.equal(out[padding], torch.zeros_like(out[padding])), "padding rows must be 0"
    assert torch.equal(x.grad[padding], torch.zeros_like(x.grad[padding]))

    def draw(g):
        fresh_x, _, _ = packed_batch(lengths, padding=3, gen=g)
        fresh_grad = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEVICE)
        return oracle_pairs(low, fresh_x, cu, positions, prefix_lens, fresh_grad, dtype)

    # The oracle's weights are the low-precision module's.
    first = oracle_pairs(low, x64, cu, positions, prefix_lens, grad, dtype)
    names = ["output", "dx"] + [f"d {name}" for name, _ in low.named_parameters()]
    assert_all_within_torch_error(
        [out.detach(), x.grad] + [p.grad for _, p in low.named_parameters()],
        [exact for _, exact in first], draw, gen,
        [FORWARD_FACTOR] + [GRADIENT_FACTOR] * (len(names) - 1), names,
        f"lengths {lengths}, {attention}/{rotary}, {dtype}", first=first)


def test_parameters_are_named_like_llama_and_tables_are_not_saved():
    module = VarlenSelfAttention(64, 8, 2, head_dim=16, bias=True)
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
    assert shapes == {"q_proj.weight": (128, 64), "q_proj.bias": (128,), "k_proj.weight": (32, 64),
                      "k_proj.bias": (32,), "v_proj.weight": (32, 64), "v_proj.bias": (32,),
                      "o_proj.weight": (64, 128)}
    assert set(module.state_dict()) == set(shapes)


def test_rotary_tables_are_llamas():
    cos, sin = rotary_tables(7, 8, theta=100.0)
    angle = 5 * 100.0 ** (-2 * 3 / 8)  # position 5, frequency 3, in both halves
    assert cos[5, 3].item() == pytest.approx(math.cos(angle)) and sin[5, 7].item() == pytest.approx(
        math.sin(angle))


def test_meta_device_build_then_reset_rotary():
    with torch.device("meta"):
        module = VarlenSelfAttention(32, 2, max_position_embeddings=8)
    module.to_empty(device="cpu")
    module.reset_rotary()
    cos, _ = rotary_tables(8, 16)
    assert torch.equal(module.rotary_cos, cos)


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="num_heads"):
        VarlenSelfAttention(64, 6, 4)
    with pytest.raises(ValueError, match="head_dim must be even"):
        VarlenSelfAttention(63, 1, head_dim=63)


def test_compiles_with_fullgraph():
    gen = torch.Generator().manual_seed(0)
    x, cu, positions = packed_batch([4, 7], padding=1, gen=gen)
    module = VarlenSelfAttention(HIDDEN, HEADS, KV_HEADS, HEAD_DIM,
                                 max_position_embeddings=16).to(DEVICE)
    x = x.float().requires_grad_()
    eager = module(x, cu, positions)
    compiled = torch.compile(module, fullgraph=True)(x, cu, positions)
    torch.testing.assert_close(compiled, eager)
    compiled.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
