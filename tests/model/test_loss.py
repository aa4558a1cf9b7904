"""The chunked linear cross-entropy: values and gradients equal the plain loss, no [N, V] float32
tensor is ever allocated, and LLM.loss normalises by the count it is given."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sphinx_model import LLM
from sphinx_model.loss import linear_cross_entropy, linear_cross_entropy_reference
from tests.model.common import TINY_DENSE, pack


def _problem(rows, hidden, vocab, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=generator, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64) * 0.3
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[torch.rand(rows, generator=generator) < 0.4] = -100
    return h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(), labels


def _value_and_grads(fn, h, w, labels, **kwargs):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, w, labels, **kwargs) / 7.0  # the backward sees a scale, as with 1/num_tokens
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_rows", [2, 7, 1000])
def test_values_and_gradients_equal_plain_cross_entropy(chunk_rows):
    h, w, labels = _problem(rows=59, hidden=16, vocab=37)
    ours = _value_and_grads(linear_cross_entropy, h, w, labels, chunk_rows=chunk_rows)
    ref = _value_and_grads(linear_cross_entropy_reference, h, w, labels)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_error_within_pytorchs_own():
    """Against float64, our bf16 loss and hidden gradient err at most 2x / 3x what the plain bf16
    computation errs; the weight gradient, summed over ~60 chunks in float32 and rounded once, errs
    like the plain one (summing in bf16 would err 2.7x here)."""
    h, w, labels = _problem(rows=400, hidden=32, vocab=61, dtype=torch.float64)
    exact = _value_and_grads(linear_cross_entropy_reference, h, w, labels)
    h16, w16 = h.detach().bfloat16(), w.detach().bfloat16()
    ours = _value_and_grads(linear_cross_entropy, h16, w16, labels, chunk_rows=4)
    plain = _value_and_grads(linear_cross_entropy_reference, h16, w16, labels)
    for name, a, p, e, limit in zip(("loss", "dh", "dW"), ours, plain, exact, (2, 3, 1.5)):
        assert a.dtype == p.dtype
        ours_err, plain_err = (a.double() - e).norm(), (p.double() - e).norm()
        assert ours_err <= limit * plain_err, (name, ours_err, plain_err)


class _LargestFloat32(TorchDispatchMode):
    """Records the largest float32 tensor any op outputs (an allocation probe)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_is_bounded_by_one_chunk_in_forward_and_backward():
    rows, hidden, vocab, chunk = 200, 16, 257, 16
    h, w, labels = _problem(rows, hidden, vocab)
    labelled = int((labels != -100).sum())
    bound = max(chunk * vocab, vocab * hidden, rows * hidden)  # a chunk's logits, dW, dh
    assert labelled * vocab > 4 * bound
    for fn, kwargs, ok in ((linear_cross_entropy, {"chunk_rows": chunk}, True),
                           (linear_cross_entropy_reference, {}, False)):
        with _LargestFloat32() as probe:
            fn(h, w, labels, **kwargs).backward()
        assert (probe.largest <= bound) == ok, (fn.__name__, probe.largest, bound)


def test_no_labelled_rows_gives_zero_and_zero_gradients():
    h, w, labels = _problem(rows=5, hidden=8, vocab=11)
    loss = linear_cross_entropy(h, w, torch.full_like(labels, -100))
    loss.backward()
    assert loss.item() == 0 and not h.grad.any() and not w.grad.any()


def test_llm_loss_is_the_sum_over_labelled_rows_over_the_given_count(reference_kernels):
    torch.manual_seed(0)
    llm = LLM(TINY_DENSE)
    ids, cu = pack([torch.randint(0, 97, (n,)) for n in (7, 4)], padding=2)
    labels = torch.cat([ids[1:], torch.tensor([-100])])
    labels[[0, 6, 10, 11, 12]] = -100
    hidden, _ = llm.hidden_states(llm.embed_tokens(ids), cu)
    logits = llm.logits(hidden).float()
    expected = torch.nn.functional.cross_entropy(logits, labels, reduction="sum") / 40
    torch.testing.assert_close(llm.loss(hidden, labels, 40), expected)
    torch.testing.assert_close(llm.loss(hidden, labels, torch.tensor(40.0)), expected)
    with pytest.raises(ValueError, match="num_trained_tokens"):
        llm.loss(hidden, labels, 0)
    labels[1] = 97
    with pytest.raises(ValueError, match="labels"):
        llm.loss(hidden, labels, 40)


@pytest.mark.gpu
def test_peak_cuda_memory_stays_below_the_full_logits():
    rows, hidden, vocab = 8192, 512, 92544
    h = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    linear_cross_entropy(h, w, labels, chunk_rows=512).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < rows * vocab * 4 / 4, extra  # a quarter of the float32 logits alone
