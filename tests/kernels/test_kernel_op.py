"""kernel_op: an op call runs the op's function directly only where nothing would see the custom op
(no gradient recorded, no compile, no dispatch / function mode, no autocast, plain CPU or CUDA
tensors), and goes through the custom op everywhere else, with the same result either way."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from sphinx_kernels.kernel_op import calls_directly, kernel_op


@kernel_op("sphinx_kernels_tests::scaled_sum")
def scaled_sum(x: torch.Tensor, others: list[torch.Tensor], factor: float) -> torch.Tensor:
    out = x * factor
    for other in others:
        out = out + other
    return out


@scaled_sum.register_fake
def _(x, others, factor):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    ctx.factor, ctx.count = inputs[2], len(inputs[1])


def _backward(ctx, grad):
    return grad * ctx.factor, [grad] * ctx.count, None


scaled_sum.register_autograd(_backward, setup_context=_setup_context)


@pytest.fixture
def paths(monkeypatch):
    """Counts the calls that took each path: ``direct`` (the function), ``op`` (the custom op)."""
    counts = {"direct": 0, "op": 0}

    def counting(path, call):
        def wrapper(*args, **kwargs):
            counts[path] += 1
            return call(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(scaled_sum, "function", counting("direct", scaled_sum.function))
    monkeypatch.setattr(scaled_sum, "op", counting("op", scaled_sum.op))
    return counts


def expected(x, others):
    return x * 3.0 + sum(others, torch.zeros_like(x))


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_untracked_call_runs_the_function(paths, context):
    x, other = torch.randn(4, 3), torch.randn(4, 3)
    with context():
        out = scaled_sum(x, [other], 3.0)
    assert paths == {"direct": 1, "op": 0}
    assert torch.equal(out, expected(x, [other]))


def test_parameters_and_inputs_without_gradient_run_the_function(paths):
    weight = torch.nn.Parameter(torch.randn(4, 3))
    with torch.no_grad():
        scaled_sum(weight, [], 3.0)
    scaled_sum(torch.randn(4, 3), [torch.randn(4, 3)], 3.0)  # grad mode on, nothing requires grad
    assert paths == {"direct": 2, "op": 0}


@pytest.mark.parametrize("requiring", ["x", "list item"])
def test_a_recorded_gradient_goes_through_the_op(paths, requiring):
    x, other = torch.randn(4, 3), torch.randn(4, 3)
    (x if requiring == "x" else other).requires_grad_(True)
    out = scaled_sum(x, [other], 3.0)
    assert paths == {"direct": 0, "op": 1}
    out.sum().backward()
    grad = x.grad if requiring == "x" else other.grad
    assert torch.equal(grad, torch.full((4, 3), 3.0 if requiring == "x" else 1.0))


class RecordingMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_dispatch_mode_sees_the_op(paths):
    x = torch.randn(4, 3)
    with torch.no_grad(), RecordingMode() as mode:
        out = scaled_sum(x, [], 3.0)
    assert paths == {"direct": 0, "op": 1}
    assert "sphinx_kernels_tests.scaled_sum.default" in mode.ops
    assert torch.equal(out, x * 3.0)


def test_fake_tensors_reach_the_fake_implementation(paths):
    with FakeTensorMode() as mode, torch.no_grad():
        out = scaled_sum(mode.from_tensor(torch.randn(4, 3)), [], 3.0)
    assert paths == {"direct": 0, "op": 1}
    assert out.shape == (4, 3)


@pytest.mark.parametrize("context", [lambda: torch.device("meta"),
                                     lambda: torch.autocast("cpu", dtype=torch.bfloat16)],
                         ids=["device context", "autocast"])
def test_modes_and_autocast_go_through_the_op(paths, context):
    x = torch.randn(4, 3)
    with torch.no_grad(), context():
        assert not calls_directly((x,))
        scaled_sum(x, [], 3.0)
    assert paths == {"direct": 0, "op": 1}


def test_meta_tensors_and_subclasses_go_through_the_op(paths):
    class Marked(torch.Tensor):
        pass

    with torch.no_grad():
        scaled_sum(torch.randn(4, 3, device="meta"), [], 3.0)
        scaled_sum(torch.randn(4, 3), [torch.randn(4, 3).as_subclass(Marked)], 3.0)
    assert paths == {"direct": 0, "op": 2}


def test_compile_captures_the_op():
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append([str(node.target) for node in gm.graph.nodes])
        return gm

    x = torch.randn(4, 3)
    compiled = torch.compile(lambda t: scaled_sum(t, [t], 3.0), fullgraph=True,
                             backend=recording_backend)
    with torch.no_grad():
        assert torch.equal(compiled(x), expected(x, [x]))
    assert any("sphinx_kernels_tests.scaled_sum" in target for target in graphs[0])
