"""Model-test fixtures."""
import pytest
import torch


@pytest.fixture
def reference_kernels(monkeypatch):
    """Every sphinx_kernels op on its pure-PyTorch reference backend: for tests of model logic
    (caches, conversions, losses) rather than of the kernels, which the Triton interpreter runs
    20-50x slower. The parity tests against transformers keep the default backends."""
    monkeypatch.setenv("SPHINX_KERNELS_BACKEND", "reference")


@pytest.fixture
def single_thread():
    """One intra-op thread for tests of many tiny ops (generation steps): on the shared 2-core
    machine under load, two threads make every small op wait for the busy second core (a [3, 128]
    linear measured 2.3 ms instead of 20 us), which costs such tests 5-10x their time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
