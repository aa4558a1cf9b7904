"""The test harness itself: the tolerance rule fails what it should, PyTorch's error is measured
over enough values, and seeds are reproducible by default and fresh on request."""
import pytest
import torch

from tests.conftest import ENV_TEST_SEED, seed_of
from tests.numerics import (
    BASELINE_DRAWS,
    BASELINE_VALUES,
    MAX_BASELINE_DRAWS,
    assert_within_torch_error,
    torch_errors,
)


def test_the_rule_fails_an_error_above_the_factor_and_passes_one_below():
    expected = torch.linspace(-1, 1, 101, dtype=torch.float64)
    torch_error = 1e-3
    assert_within_torch_error((expected + 1.9e-3).float(), expected, torch_error, 2.0, "inside")
    with pytest.raises(AssertionError, match="exceeds 2.0x PyTorch's own float32 error"):
        assert_within_torch_error((expected + 2.1e-3).float(), expected, torch_error, 2.0, "out")


def test_pytorch_output_stands_for_its_error_on_one_draw():
    expected = torch.linspace(-1, 1, 101, dtype=torch.float64)
    torch_output = (expected + 1e-3).float()  # PyTorch's own result: error 1e-3
    assert_within_torch_error((expected + 1.9e-3).float(), expected, torch_output, 2.0, "inside")
    with pytest.raises(AssertionError, match="exceeds 2.0x"):
        assert_within_torch_error((expected + 2.1e-3).float(), expected, torch_output, 2.0, "out")


def test_one_rounding_is_allowed_where_pytorch_is_exact():
    expected = torch.tensor([1.0, 0.5], dtype=torch.float64)
    one_ulp_off = torch.tensor([1.0, 0.5 + 2**-24])  # half an ulp of 1.0, times 2
    assert_within_torch_error(one_ulp_off, expected, 0.0, 2.0, "one rounding")
    with pytest.raises(AssertionError):
        assert_within_torch_error(one_ulp_off * 1.001, expected, 0.0, 2.0, "more")


def test_pytorch_error_is_pooled_until_enough_values_and_draws():
    calls = []

    def draw(gen):
        calls.append(1)
        value = torch.rand(3, generator=gen, dtype=torch.float64)
        return [(value.float(), value), (torch.zeros(0), torch.zeros(0, dtype=torch.float64))]

    errors = torch_errors(draw, torch.Generator().manual_seed(0))
    assert len(calls) == MAX_BASELINE_DRAWS  # 3 values a draw never reach BASELINE_VALUES
    assert errors[0] > 0 and errors[1] == 0.0
    calls.clear()
    big = [(torch.ones(BASELINE_VALUES), torch.ones(BASELINE_VALUES, dtype=torch.float64))]
    torch_errors(lambda gen: calls.append(1) or big, torch.Generator(), first=big)
    assert len(calls) == BASELINE_DRAWS - 1  # the case's own draw counts


def test_seeds_come_from_the_test_id_unless_asked_otherwise(monkeypatch):
    monkeypatch.delenv(ENV_TEST_SEED, raising=False)
    assert seed_of("tests/a.py::test_x") == seed_of("tests/a.py::test_x")
    assert seed_of("tests/a.py::test_x") != seed_of("tests/a.py::test_y")
    monkeypatch.setenv(ENV_TEST_SEED, "1234")
    assert seed_of("tests/a.py::test_x") == 1234
    monkeypatch.setenv(ENV_TEST_SEED, "random")
    assert len({seed_of("tests/a.py::test_x") for _ in range(5)}) > 1


def test_the_global_generators_are_seeded_from_the_test(seed):
    here = torch.rand(3)
    torch.manual_seed(seed)
    assert torch.equal(here, torch.rand(3))
