"""nn.VarlenSelfAttention against a float64 Llama attention written out per sequence (Hugging Face's
formulas: projections, rotate_half rotary, GQA by repeating kv heads, causal softmax, output
projection), on the kernel backends and the reference; padding rows; Llama parameter names; compile."""
from __future__ import annotations

import math
import random

import pytest
import torch

from sphinx_kernels.nn import VarlenSelfAttention, rotary_tables
from sphinx_kernels.ops.varlen_attention import VARLEN_ATTENTION_BACKENDS
from tests.numerics import FORWARD_FACTOR, GRADIENT_FACTOR, assert_within_torch_error

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
    positions = torch.cat([torch.arange(n) for n in lengths] + [torch.zeros(padding, dtype=torch.long)])
    x = torch.randn(int(cu[-1]) + padding, HIDDEN, generator=gen, dtype=torch.float64)
    return x.to(DEVICE), cu.to(DEVICE), positions.to(DEVICE)


def llama_attention(module, x, cu, positions, prefix_lens=None, dtype=torch.float64):
    """The module's function evaluated in ``dtype`` with plain PyTorch, one sequence at a time."""
    weights = {n: p.to(dtype) for n, p in module.named_parameters()}  # gradients reach the module
    cos, sin = (t.to(dtype) for t in rotary_tables(positions.max().item() + 1, HEAD_DIM,
                                                  device=x.device))
    x = x.to(dtype)

    def rotate(t, pos):
        first, second = t.chunk(2, dim=-1)
        return t * cos[pos][:, None] + torch.cat([-second, first], -1) * sin[pos][:, None]

    # Projections over all packed rows at once, as the module does (the same GEMMs, so the comparison
    # isolates rotary and attention); attention one sequence at a time.
    linear = torch.nn.functional.linear
    q_all = linear(x, weights["q_proj.weight"]).view(-1, HEADS, HEAD_DIM)
    k_all = linear(x, weights["k_proj.weight"]).view(-1, KV_HEADS, HEAD_DIM)
    v_all = linear(x, weights["v_proj.weight"]).view(-1, KV_HEADS, HEAD_DIM)
    attended = torch.zeros(x.shape[0], HEADS * HEAD_DIM, dtype=dtype, device=x.device)
    offsets = cu.tolist()
    for b in range(len(offsets) - 1):
        rows = slice(offsets[b], offsets[b + 1])
        n, pos = offsets[b + 1] - offsets[b], positions[rows]
        q, k = rotate(q_all[rows], pos), rotate(k_all[rows], pos)
        k, v = (t.repeat_interleave(HEADS // KV_HEADS, dim=1) for t in (k, v_all[rows]))
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(HEAD_DIM)
        visible = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        if prefix_lens is not None:
            p = int(prefix_lens[b])
            visible[:p, :p] = True
        scores = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        attended[rows] = torch.einsum("hqk,khd->qhd", scores, v).reshape(n, HEADS * HEAD_DIM)
    out = linear(attended, weights["o_proj.weight"])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backends", kernel_backends(), ids=lambda b: b[0])
@pytest.mark.parametrize("prefix", [False, True])
def test_output_and_gradients_within_tolerance(backends, dtype, prefix, monkeypatch):
    attention, rotary = backends
    monkeypatch.setenv("SPHINX_KERNELS_BACKEND", f"varlen_attention={attention},apply_rotary={rotary}")
    seed = random.SystemRandom().randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    # At least one sequence of several tokens: with only 0- and 1-token sequences the q and k
    # gradients are exactly 0 and the rule would allow no rounding at all.
    lengths = [rng.choice((0, 1, 7, 30)) for _ in range(rng.randint(0, 3))] + [rng.choice((7, 30))]
    rng.shuffle(lengths)
    x64, cu, positions = packed_batch(lengths, padding=3, gen=gen)
    prefix_lens = (torch.tensor([rng.randint(0, n) for n in lengths], dtype=torch.int32, device=DEVICE)
                   if prefix else None)
    module = VarlenSelfAttention(HIDDEN, HEADS, KV_HEADS, HEAD_DIM, max_position_embeddings=64).to(DEVICE)
    torch.nn.init.normal_(module.o_proj.weight, std=0.2, generator=gen)
    low = module.to(dtype)
    x = x64.to(dtype).requires_grad_()
    out = low(x, cu, positions, prefix_lens=prefix_lens)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    out.backward(grad.to(dtype))

    def oracle(run_dtype):
        ref = VarlenSelfAttention(HIDDEN, HEADS, KV_HEADS, HEAD_DIM, max_position_embeddings=64).to(DEVICE)
        ref.load_state_dict(low.state_dict())
        ref = ref.to(run_dtype)
        xr = x64.to(run_dtype, copy=True).requires_grad_()
        y = llama_attention(ref, xr, cu, positions, prefix_lens, dtype=run_dtype)
        y.backward(grad.to(run_dtype))
        return y, xr.grad, {n: p.grad for n, p in ref.named_parameters()}

    # Parameters move to dtype in the oracle too: its weights are the low-precision module's.
    want, want_dx, want_dw = oracle(torch.float64)
    same, same_dx, same_dw = oracle(dtype)
    what = f"seed {seed}, lengths {lengths}, {attention}/{rotary}, {dtype}"
    assert_within_torch_error(out, want, same, FORWARD_FACTOR, f"output ({what})")
    assert_within_torch_error(x.grad, want_dx, same_dx, GRADIENT_FACTOR, f"dx ({what})")
    for name, param in low.named_parameters():
        assert_within_torch_error(param.grad, want_dw[name], same_dw[name], GRADIENT_FACTOR,
                                  f"d {name} ({what})")
    padding = slice(int(cu[-1]), None)
    assert torch.equal(out[padding], torch.zeros_like(out[padding])), "padding rows must be 0"
    assert torch.equal(x.grad[padding], torch.zeros_like(x.grad[padding]))


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
    module = VarlenSelfAttention(HIDDEN, HEADS, KV_HEADS, HEAD_DIM, max_position_embeddings=16).to(DEVICE)
    x = x.float().requires_grad_()
    eager = module(x, cu, positions)
    compiled = torch.compile(module, fullgraph=True)(x, cu, positions)
    torch.testing.assert_close(compiled, eager)
    compiled.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
