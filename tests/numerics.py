"""The tolerance rule of DESIGN.md: against a float64 reference, a kernel's error may be at most
``factor`` times the error of the same computation done by PyTorch in the kernel's dtype (2 for outputs,
3 for gradients)."""
from __future__ import annotations

import math

import torch

FORWARD_FACTOR = 2.0
GRADIENT_FACTOR = 3.0


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return float((actual.detach().double() - expected.detach().double()).abs().max())


def half_ulp(values: torch.Tensor, dtype: torch.dtype) -> float:
    """Half the spacing of ``dtype`` at the largest magnitude in ``values``: one rounding's bound."""
    largest = float(values.abs().max()) if values.numel() else 0.0
    if largest == 0.0 or not math.isfinite(largest):
        return 0.0
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(largest)) / 2


def assert_within_torch_error(actual: torch.Tensor, expected64: torch.Tensor,
                              torch_same_dtype: torch.Tensor, factor: float, what: str, *,
                              baseline_floor: float = 0.0) -> None:
    """``actual`` (kernel, low precision) vs ``expected64`` (float64 reference), judged against the
    error of ``torch_same_dtype`` (PyTorch's own result in the kernel's dtype). Where PyTorch happens
    to be exact, one rounding of the expected value in the kernel's dtype is still allowed: the bound
    of one rounding (half an ulp of the largest value), not the error of the rounding, which is 0 for
    a value the dtype holds exactly (a loss of exactly 1, a probability of 1/2).

    ``baseline_floor``: PyTorch's error on the same computation measured on a larger sample, for
    outputs too few for their own maximum error to say anything (a single token's 48 values are
    often all within one ulp by luck)."""
    assert actual.shape == expected64.shape, f"{what}: shape {actual.shape} != {expected64.shape}"
    baseline = max(max_error(torch_same_dtype, expected64), baseline_floor)
    rounding = half_ulp(expected64, actual.dtype)
    limit = factor * max(baseline, rounding)
    error = max_error(actual, expected64)
    assert error <= limit, (f"{what}: max error {error:.3g} exceeds {factor}x PyTorch's own "
                            f"{str(actual.dtype).removeprefix('torch.')} error ({baseline:.3g})")
