"""What every fuzz test shares: hypothesis settings with reproducible seeds, the case counters,
tensor layouts an adversarial caller hands in, the input-mutation guard, and the comparisons with
the reference and with float64 math.

Seeds: hypothesis runs derandomized (the examples follow from the test, the same in every run), as
the rest of the suite is seeded from the test id, and reports a failing case as drawn (no shrinking:
a shrink of a Triton case reruns the interpreter hundreds of times, longer than CI's budget).
``SPHINX_KERNELS_TEST_SEED=random`` draws fresh examples and shrinks a failing one (fuzzing by hand;
a failure prints ``@seed(N)``), ``SPHINX_KERNELS_TEST_SEED=N`` reruns with that seed.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from typing import Callable, Sequence

import hypothesis
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from tests.conftest import ENV_TEST_SEED
from tests.variants import expanded, same_bits, strided

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The interpreter's bf16 arithmetic is wrong (docs/environment.md): the Triton backends are fuzzed
# in float32 and float16 here, bf16 on a GPU.
FLOAT_DTYPES = (torch.float32, torch.float16)
# Every floating dtype an op may be asked for (bfloat16 and float64 served or refused by name), and
# the index dtypes every op takes.
ALL_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)

# (kind, op, backend) -> cases run; kind is "valid", "invalid" or "unchecked" (index values that
# reach a kernel past validation, as on a GPU). The fresh interpreter running the risky cases
# reports its counts back (tests/fuzz/risky.py).
CASES: Counter = Counter()


def record(kind: str, op: str, backend: str = "-") -> None:
    CASES[kind, op, backend] += 1


def fuzz(max_examples: int):
    """The hypothesis settings of a fuzz test (see the module docstring for the seeds)."""
    chosen = os.environ.get(ENV_TEST_SEED, "").strip()
    phases = tuple(Phase) if chosen else tuple(p for p in Phase if p != Phase.shrink)
    common = settings(max_examples=max_examples, deadline=None, database=None, print_blob=True,
                      derandomize=not chosen, phases=phases, suppress_health_check=[
                          HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                          HealthCheck.data_too_large])

    def apply(test):
        test = common(test)
        if chosen and chosen != "random":
            test = hypothesis.seed(int(chosen))(test)
        return test
    return apply


def explore(strategy, check: Callable[[object], None], max_examples: int) -> None:
    """``check(case)`` on ``max_examples`` cases drawn from ``strategy`` (seeds and the report of a
    failing case: the module docstring)."""
    @fuzz(max_examples)
    @hypothesis.given(strategy)
    def run(case):
        check(case)

    run()


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


seeds = st.integers(0, 2**31 - 1)


# ----------------------------------------------------------------------------------------------
# Values and layouts


def random_floats(shape, dtype, gen, scale=1.0, special: float = 0.0) -> torch.Tensor:
    """float64 normal draws rounded to ``dtype``; a fraction ``special`` of the entries NaN, +inf or
    -inf."""
    values = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if special and values.numel():
        pick = torch.rand(shape, generator=gen, dtype=torch.float64) < special
        kind = torch.randint(3, shape, generator=gen)
        values[pick & (kind == 0)] = float("nan")
        values[pick & (kind == 1)] = float("inf")
        values[pick & (kind == 2)] = float("-inf")
    return values.to(dtype).to(DEVICE)


LAYOUTS = ("contiguous", "offset", "strided", "expanded", "transposed")


def with_layout(t: torch.Tensor, layout: str, dim: int = 0,
                requires_grad: bool = False) -> torch.Tensor:
    """``t``'s values in another layout: ``offset`` (a contiguous view starting inside a larger
    buffer), ``strided`` (stride x2 along ``dim``, gaps poisoned: tests/variants.py), ``expanded``
    (the first slice along ``dim`` broadcast with stride 0: the values change to it),
    ``transposed`` (dims ``dim`` and ``dim + 1`` swapped in memory, the same values), or a fresh
    contiguous copy. With ``requires_grad`` it is a view of a new leaf (``torch.autograd.grad``
    gives its gradient)."""
    t = t.detach()
    if layout == "contiguous" or t.dim() == 0:
        return t.clone().requires_grad_(requires_grad)
    if layout == "offset":
        buffer = torch.empty(t.numel() + 3, dtype=t.dtype, device=t.device)
        buffer[3:] = t.flatten()
        return buffer.requires_grad_(requires_grad)[3:].view(t.shape)
    if layout == "strided":
        return strided(t.clone().requires_grad_(requires_grad), dim)
    if layout == "expanded":
        if t.shape[dim] == 0:
            return t.clone().requires_grad_(requires_grad)
        first = t.narrow(dim, 0, 1).contiguous().requires_grad_(requires_grad)
        return expanded(first, t.shape)
    if layout == "transposed":
        if dim + 1 >= t.dim():
            return t.clone().requires_grad_(requires_grad)
        swapped = t.transpose(dim, dim + 1).contiguous().requires_grad_(requires_grad)
        return swapped.transpose(dim, dim + 1)
    raise ValueError(f"unknown layout {layout!r}")


def layouts(allowed: Sequence[str] = LAYOUTS):
    return st.sampled_from(tuple(allowed))


def plain(t: torch.Tensor | None, dtype: torch.dtype | None = None,
          requires_grad: bool = False) -> torch.Tensor | None:
    """A fresh contiguous copy of ``t``'s values (in ``dtype``): what the reference is given."""
    if t is None:
        return None
    copy = t.detach().to(dtype or t.dtype).contiguous().clone()
    return copy.requires_grad_(requires_grad)


# ----------------------------------------------------------------------------------------------
# Inputs are never mutated


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage().clone())


class Unchanged:
    """Snapshots the whole storage behind every tensor in ``tensors`` (the gaps of a strided view
    too); :meth:`check` asserts not a byte changed."""

    def __init__(self, tensors: Sequence):
        self.saved = [(t, _storage_bytes(t)) for t in tensors if isinstance(t, torch.Tensor)]

    def check(self, what: str) -> None:
        for i, (t, before) in enumerate(self.saved):
            assert torch.equal(_storage_bytes(t), before), f"{what}: input {i} was modified"


def tensors_in(*values) -> list[torch.Tensor]:
    """The tensors in nested lists, tuples, dicts and named tuples."""
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict):
            found.extend(tensors_in(*value.values()))
        elif isinstance(value, (list, tuple)):
            found.extend(tensors_in(*value))
    return found


# ----------------------------------------------------------------------------------------------
# Comparisons

# A kernel's error may be this many times the reference's own same-dtype error against float64
# (on this draw), or, where the reference is (luckily) more exact, ULPS ulps of the output's largest
# magnitude plus ABSOLUTE_EPS machine epsilons (the fuzzed inputs are of order 1, and so are the
# terms of any cancellation that leaves a small output): wide enough for every rounding order, far
# below what a misread stride, a wrong index or a value from another row gives. float64 results
# (the reference backend's) are held to float32's epsilon there: their reference is the same
# computation, exact only up to its own order of operations, which an ill-conditioned output (a
# LayerNorm of a nearly constant row) magnifies.
ERROR_FACTOR = 4.0
ULPS = 32
ABSOLUTE_EPS = 4


def assert_same_nonfinite(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """NaN where ``expected`` is NaN, and the same infinities, nowhere else."""
    assert torch.equal(got.isnan(), expected.isnan()), (
        f"{what}: NaN at {got.isnan().nonzero()[:5].tolist()}, expected at "
        f"{expected.isnan().nonzero()[:5].tolist()}")
    inf = expected.isinf()
    assert torch.equal(got.isinf(), inf), f"{what}: infinities differ"
    assert torch.equal(got[inf], expected[inf].to(got.dtype)), f"{what}: signs of inf differ"


def assert_close_to_float64(got: torch.Tensor, same_dtype: torch.Tensor, exact: torch.Tensor,
                            what: str, nonfinite: bool = True) -> None:
    """``got`` (a backend's result) against ``exact`` (the reference in float64), judged by
    ``same_dtype`` (the reference in ``got``'s dtype): the same NaN / inf (``nonfinite``), and on
    the finite entries an error of at most ``ERROR_FACTOR`` times the reference's (at least ``ULPS``
    ulps of the largest expected magnitude)."""
    assert got.shape == exact.shape, f"{what}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    assert got.dtype == same_dtype.dtype, f"{what}: dtype {got.dtype} != {same_dtype.dtype}"
    if nonfinite:
        assert_same_nonfinite(got, exact, what)
    finite = torch.isfinite(exact) & torch.isfinite(got)
    if not finite.any():
        return
    exact64 = exact.double()[finite]
    error = float((got.double()[finite] - exact64).abs().max())
    reference_error = float((same_dtype.double()[finite] - exact64).abs().nan_to_num(0).max())
    largest = float(exact64.abs().max())
    eps = max(torch.finfo(got.dtype).eps, torch.finfo(torch.float32).eps)
    ulp = eps * (2.0 ** math.floor(math.log2(largest)) if largest else 0)
    limit = ERROR_FACTOR * max(reference_error, ULPS * ulp + ABSOLUTE_EPS * eps)
    assert error <= limit, (f"{what}: error {error:.3g} > {limit:.3g} (the reference's own "
                            f"{reference_error:.3g}, largest value {largest:.3g})")


def assert_all_close(got: Sequence[torch.Tensor], same_dtype: Sequence[torch.Tensor],
                     exact: Sequence[torch.Tensor], names: Sequence[str], what: str,
                     nonfinite: bool = True) -> None:
    for g, s, e, name in zip(got, same_dtype, exact, names, strict=True):
        assert_close_to_float64(g, s, e, f"{what}: {name}", nonfinite)


def assert_bits(got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor],
                names: Sequence[str], what: str) -> None:
    """Exact data movement: the same bits (NaN included)."""
    for g, e, name in zip(got, expected, names, strict=True):
        assert same_bits(g, e), f"{what}: {name} differs from the reference"


def gradients(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
              grad_outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of ``inputs`` (a zero tensor where one gets none)."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
    if not pairs or not inputs:
        return [torch.zeros_like(t) for t in inputs]
    found = torch.autograd.grad([o for o, _ in pairs], list(inputs), [g for _, g in pairs],
                                allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, found)]


def run_backends(op: str, backends: Sequence[str], call: Callable[[str], Sequence[torch.Tensor]],
                 inputs: Sequence, check: Callable[[str, Sequence[torch.Tensor]], None]) -> None:
    """For every backend: ``call(backend)``'s results checked by ``check(backend, results)``, the
    inputs unmodified, one valid case counted."""
    for backend in backends:
        unchanged = Unchanged(tensors_in(inputs))
        results = call(backend)
        unchanged.check(f"{op} on {backend}")
        check(backend, results)
        record("valid", op, backend)


# ----------------------------------------------------------------------------------------------
# Invalid inputs


def assert_rejects(op: str, call: Callable[[], object], error: type[Exception], name: str) -> None:
    """``call()`` raises ``error`` whose message names ``name``; one invalid case counted."""
    try:
        call()
    except error as raised:
        assert name in str(raised), f"{op}: {error.__name__} does not name {name!r}: {raised}"
    except Exception as raised:  # noqa: BLE001 (any other exception is the failure reported)
        raise AssertionError(f"{op}: expected {error.__name__} naming {name!r}, got "
                             f"{type(raised).__name__}: {raised}") from raised
    else:
        raise AssertionError(f"{op}: expected {error.__name__} naming {name!r}, nothing raised")
    record("invalid", op)


# A mutation of a valid call's arguments (a dict): (what it does, the mutation (in place), the
# exception expected, the argument its message must name).
Mutation = tuple[str, Callable[[dict], None], type[Exception], str]


def setting(key: str, value) -> Callable[[dict], None]:
    """The mutation that sets argument ``key`` to ``value`` (or to ``value(arguments)``)."""
    def mutate(args):
        args[key] = value(args) if callable(value) else value
    return mutate


def replacing(key: str, values, name: str | None = None) -> list[Mutation]:
    """Mutations setting ``key`` to each of ``values`` ((value, exception) pairs)."""
    return [(f"{key}={value!r}", setting(key, value), error, name or key)
            for value, error in values]


def explore_invalid(op: str, make_valid: Callable[[torch.Generator], dict],
                    mutations: Sequence[Mutation], call: Callable[[dict], object],
                    max_examples: int) -> None:
    """Per drawn seed, every mutation of a valid call built from that seed: each must raise its
    exception naming its argument (one invalid case each)."""
    def check(seed):
        for label, mutate, error, name in mutations:
            args = make_valid(generator(seed))
            mutate(args)
            try:
                assert_rejects(op, lambda: call(args), error, name)
            except AssertionError as failure:
                raise AssertionError(f"{op}, {label}: {failure}") from failure
    explore(seeds, check, max_examples)


# What an adversarial caller passes where a tensor, an int, a bool or a float belongs: (value,
# the exception expected).
NOT_TENSORS = [(None, TypeError), ([1, 2], TypeError), (3.0, TypeError), ("x", TypeError)]
BAD_INTS = [(2.0, TypeError), (True, TypeError), (None, TypeError), ("3", TypeError),
            (2**70, ValueError), (-(2**70), ValueError)]
BAD_BOOLS = [(1, TypeError), (None, TypeError), (0.0, TypeError), ("yes", TypeError)]
BAD_FLOATS = [(float("nan"), ValueError), (float("inf"), ValueError), (10**400, ValueError),
              (True, TypeError), ("0.1", TypeError)]
