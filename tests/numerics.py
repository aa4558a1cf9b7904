"""The tolerance rule (docs/numerics.md): against a float64 reference, a kernel's error may be at
most ``factor`` times PyTorch's own error on the same computation in the kernel's dtype (2 for
outputs, 3 for gradients).

PyTorch's error is measured one way for every op, by :func:`torch_errors`: the largest error of the
same-dtype PyTorch computation over the case's own inputs and fresh draws of inputs of the same
shapes, until every output has been measured over at least ``BASELINE_VALUES`` values and
``BASELINE_DRAWS`` draws. A maximum over a handful of values is a coin flip (a few roundings, often
exact by luck); over thousands it is PyTorch's error at that size. Where even that error is 0 (a
value the dtype holds exactly), one rounding of the expected value is still allowed.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import pytest
import torch

FORWARD_FACTOR = 2.0
GRADIENT_FACTOR = 3.0
BASELINE_VALUES = 8192
BASELINE_DRAWS = 3
MAX_BASELINE_DRAWS = 16

# One evaluation of a computation on fresh inputs of the case's shapes: a (same-dtype PyTorch
# result, float64 reference) pair per output.
Draw = Callable[[torch.Generator], Sequence[tuple[torch.Tensor, torch.Tensor]]]


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return float((actual.detach().double() - expected.detach().double()).abs().max())


def half_ulp(values: torch.Tensor, dtype: torch.dtype) -> float:
    """Half the spacing of ``dtype`` at the largest magnitude in ``values``: one rounding's
    bound."""
    largest = float(values.detach().abs().max()) if values.numel() else 0.0
    if largest == 0.0 or not math.isfinite(largest):
        return 0.0
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(largest)) / 2


def torch_errors(draw: Draw, generator: torch.Generator,
                 first: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> list[float]:
    """PyTorch's own error of each output of a computation: the largest ``|same - float64|`` over
    ``first`` (the case's own pairs, when the test has computed them) and ``draw(generator)`` calls,
    until each output has ``BASELINE_VALUES`` values over ``BASELINE_DRAWS`` draws (at most
    ``MAX_BASELINE_DRAWS``)."""
    pairs = list(first) if first is not None else list(draw(generator))
    errors, counts, draws = [0.0] * len(pairs), [0] * len(pairs), 0
    while True:
        for i, (same, expected) in enumerate(pairs):
            errors[i] = max(errors[i], max_error(same, expected))
            counts[i] += same.numel() or BASELINE_VALUES  # an empty output has nothing to measure
        draws += 1
        if draws >= MAX_BASELINE_DRAWS or (draws >= BASELINE_DRAWS
                                           and min(counts) >= BASELINE_VALUES):
            return errors
        pairs = list(draw(generator))


def assert_within_torch_error(actual: torch.Tensor, expected64: torch.Tensor,
                              torch_error: float | torch.Tensor, factor: float, what: str) -> None:
    """``actual`` (a kernel's result in a low dtype) against ``expected64`` (the float64 reference),
    judged by ``torch_error``, PyTorch's own error (:func:`torch_errors`). Where PyTorch is exact,
    one rounding of the expected value in the kernel's dtype is still allowed: the bound of one
    rounding (half an ulp of the largest value), not the error of the rounding, which is 0 for a
    value the dtype holds exactly (a loss of exactly 1, a probability of 1/2).

    ``torch_error`` may also be PyTorch's own result in the kernel's dtype on these inputs alone
    (its error on this one draw): the form of the tests written before :func:`torch_errors`
    (tests/integrations), weaker on small outputs; the kernels' tests use the measured one."""
    assert actual.shape == expected64.shape, f"{what}: shape {actual.shape} != {expected64.shape}"
    if isinstance(torch_error, torch.Tensor):
        torch_error = max_error(torch_error, expected64)
    limit = factor * max(torch_error, half_ulp(expected64, actual.dtype))
    error = max_error(actual, expected64)
    assert error <= limit, (f"{what}: max error {error:.3g} exceeds {factor}x PyTorch's own "
                            f"{str(actual.dtype).removeprefix('torch.')} error ({torch_error:.3g})")


def assert_all_within_torch_error(actual: Sequence[torch.Tensor],
                                  expected64: Sequence[torch.Tensor], draw: Draw,
                                  generator: torch.Generator, factors: Sequence[float],
                                  names: Sequence[str], what: str,
                                  first: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None
                                  ) -> None:
    """:func:`assert_within_torch_error` for every output of one computation, each judged by
    PyTorch's error on that output (``draw``, ``first``: see :func:`torch_errors`)."""
    errors = torch_errors(draw, generator, first)
    for got, expected, error, factor, name in zip(actual, expected64, errors, factors, names,
                                                  strict=True):
        assert_within_torch_error(got, expected, error, factor, f"{name}, {what}")


def interpreter_rounds_bf16(backend: str, dtype: torch.dtype) -> bool:
    """Whether ``backend``'s ``dtype`` results are the Triton interpreter's bf16, which truncates
    float32 -> bfloat16 where GPUs round to nearest even (docs/environment.md): those results are
    checked on a GPU. Data movement is exact regardless."""
    from sphinx_kernels.platforms import triton_interpreted
    return backend == "triton" and dtype == torch.bfloat16 and triton_interpreted()


def skip_if_interpreter_rounds_bf16(backend: str, dtype: torch.dtype) -> None:
    """Skips the test where :func:`interpreter_rounds_bf16`."""
    __tracebackhide__ = True  # the skip is reported at the test's line
    if interpreter_rounds_bf16(backend, dtype):
        pytest.skip("bf16 rounding of the Triton interpreter; checked on a GPU")
