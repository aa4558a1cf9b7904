"""Model-test fixtures."""
import pytest


@pytest.fixture
def reference_kernels(monkeypatch):
    """Every sphinx_kernels op on its pure-PyTorch reference backend: for tests of model logic
    (caches, conversions, losses) rather than of the kernels, which the Triton interpreter runs
    20-50x slower. The parity tests against transformers keep the default backends."""
    monkeypatch.setenv("SPHINX_KERNELS_BACKEND", "reference")
