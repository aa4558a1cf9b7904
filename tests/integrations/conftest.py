"""Fixtures of the integration tests."""
import pytest

from sphinx_kernels.backends import ENV_BACKEND


@pytest.fixture
def reference_ops(monkeypatch):
    """sphinx_kernels' ops on their pure-PyTorch references, for tests of an integration's own logic
    (which sequences, which layout, which error): there the Triton interpreter's seconds per model
    step check nothing new. The kernels themselves run in the parity tests that do not take this
    fixture, and in tests/kernels."""
    monkeypatch.setenv(ENV_BACKEND, "reference")
