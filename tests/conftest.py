"""Test set-up: without a GPU, Triton kernels run under the interpreter on CPU tensors. The variable must
be set before any @triton.jit function is defined, so before sphinx_kernels is imported."""
import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def value_checks_on(monkeypatch):
    """Index-value checks on every device: on a GPU they are off by default (each costs a host sync),
    and bad-input tests must see the ValueError there too."""
    monkeypatch.setenv("SPHINX_KERNELS_CHECK_INPUTS", "1")
