"""The packed attention batches the ``varlen_attention`` tests (and its peers' glue tests) draw."""
from __future__ import annotations

import random

import torch

import sphinx_kernels
from sphinx_kernels.ops.varlen_attention import varlen_attention_reference
from tests.numerics import FORWARD_FACTOR, GRADIENT_FACTOR, assert_all_within_torch_error

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The FlashAttention-2 peers' glue: GPU only, needs max_seqlen and serves no prefix, so the tests of
# every backend leave them to their own tests (test_torch_flash.py, test_flash_attn.py).
FLASH_PEERS = ("torch_flash", "flash_attn")
LENGTHS = (0, 1, 7, 59, 97, 130)
HEAD_DIMS = (16, 24, 32, 40, 64, 80, 96, 128)


def cu_seqlens(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32).to(DEVICE)


class Case:
    """A random packed batch: lengths, heads, head dim and mode drawn with ``config_seed``, values
    with ``seed`` (the test's); a few padding rows after the last sequence of both q and k."""

    def __init__(self, config_seed, dtype, mode="causal", separate_keys=False, max_seqs=9,
                 lengths=LENGTHS, head_dims=HEAD_DIMS, first_lens_q=(), first_lens_k=(), seed=0):
        rng = random.Random(config_seed)
        num = max(rng.randint(1, max_seqs), len(first_lens_q))
        self.lens_q = [rng.choice(lengths) for _ in range(num)]
        # One long sequence: several blocks.
        self.lens_q[rng.randrange(num)] = rng.choice(lengths[-2:])
        self.lens_k = [rng.choice(lengths) for _ in range(num)] if separate_keys else self.lens_q
        # Chosen cases first (bottom-right corners), drawn ones after.
        self.lens_q[:len(first_lens_q)] = first_lens_q
        self.lens_k[:len(first_lens_k)] = first_lens_k
        self.kv_heads = rng.choice((1, 2))
        self.heads = self.kv_heads * rng.choice((1, 2, 4))
        self.head_dim = rng.choice(head_dims)
        self.causal = mode != "non-causal"
        self.prefix = (torch.tensor([rng.randint(0, n) for n in self.lens_k], dtype=torch.int32,
                                    device=DEVICE) if mode == "prefix" else None)
        self.cu_q = cu_seqlens(self.lens_q)
        self.cu_k = cu_seqlens(self.lens_k) if separate_keys else None
        pad = rng.randint(0, 3)
        total_q = sum(self.lens_q) + pad
        total_k = sum(self.lens_k) + (rng.randint(0, 3) if separate_keys else pad)
        self.seed = seed
        self.dtype = dtype
        self.shapes = ((total_q, self.heads, self.head_dim),
                       (total_k, self.kv_heads, self.head_dim))
        self.q, self.k, self.v, self.grad = self.draw(torch.Generator().manual_seed(seed))

    def draw(self, gen):
        """Fresh (q, k, v, grad) of the case's shapes: float64 draws rounded to its dtype."""
        shape_q, shape_k = self.shapes
        return [torch.randn(shape, generator=gen, dtype=torch.float64).to(self.dtype).to(DEVICE)
                for shape in (shape_q, shape_k, shape_k, shape_q)]

    def describe(self):
        return (f"lens_q={self.lens_q} lens_k={self.lens_k} heads={self.heads}/{self.kv_heads} "
                f"D={self.head_dim} causal={self.causal} prefix="
                f"{None if self.prefix is None else self.prefix.tolist()} seed={self.seed}")

    def kwargs(self):
        return dict(causal=self.causal, prefix_lens=self.prefix)

    def run(self, backend, **extra):
        """``[out, dq, dk, dv]`` of the public op on ``backend``."""
        inputs = [t.detach().requires_grad_() for t in (self.q, self.k, self.v)]
        out = sphinx_kernels.varlen_attention(*inputs, self.cu_q, self.cu_k, backend=backend,
                                              **self.kwargs(), **extra)
        out.backward(self.grad)
        return [out.detach()] + [t.grad for t in inputs]

    def run_reference(self, dtype, values=None):
        """Output and gradients of the reference function differentiated by autograd, in ``dtype``,
        on the case's (q, k, v, grad) or ``values``."""
        q, k, v, grad = values or (self.q, self.k, self.v, self.grad)
        inputs = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
        out, _ = varlen_attention_reference(*inputs, self.cu_q, self.cu_k, **self.kwargs())
        out.backward(grad.to(dtype))
        # No sequence that reads a tensor (all empty): autograd leaves its gradient None.
        return [out.detach()] + [torch.zeros_like(t) if t.grad is None else t.grad for t in inputs]

    def reference_pairs(self, values=None):
        """(same dtype, float64) pairs of the reference's output and gradients: PyTorch's error."""
        return list(zip(self.run_reference(self.dtype, values),
                        self.run_reference(torch.float64, values)))


def assert_matches_float64(case: Case, backend: str, **extra) -> None:
    """The op's output and gradients on ``backend`` against the float64 reference, judged by the
    reference's own error in the case's dtype (tests/numerics.py)."""
    first = case.reference_pairs()
    assert_all_within_torch_error(
        case.run(backend, **extra), [exact for _, exact in first],
        lambda gen: case.reference_pairs(case.draw(gen)), torch.Generator().manual_seed(case.seed),
        [FORWARD_FACTOR] + [GRADIENT_FACTOR] * 3, ["out", "dq", "dk", "dv"],
        f"{backend} {str(case.dtype).removeprefix('torch.')} {case.describe()}", first=first)
