"""Test set-up.

Without a GPU, Triton kernels run under the interpreter on CPU tensors. The variable must be set
before any ``@triton.jit`` function is defined, so before sphinx_kernels is imported.

Every test runs with torch's and Python's global random generators seeded from its id, and the
``seed`` fixture gives that seed for explicit generators: a run is reproducible by default. Set
``SPHINX_KERNELS_TEST_SEED=random`` for fresh seeds (fuzzing), or to a number to rerun with that
seed; a failing test reports the seed it ran with. Hypothesis tests are derandomized the same way
(a fixed example sequence per test) unless ``SPHINX_KERNELS_TEST_SEED=random``.
"""
import os
import random
import zlib

import hypothesis
import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

ENV_TEST_SEED = "SPHINX_KERNELS_TEST_SEED"

hypothesis.settings.register_profile("reproducible", derandomize=True, deadline=None)
hypothesis.settings.register_profile("random", deadline=None)
hypothesis.settings.load_profile(
    "random" if os.environ.get(ENV_TEST_SEED, "").strip() == "random" else "reproducible")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def seed_of(node_id: str) -> int:
    """The seed of the test ``node_id``: from its id, or as ``SPHINX_KERNELS_TEST_SEED`` says."""
    chosen = os.environ.get(ENV_TEST_SEED, "").strip()
    if chosen == "random":
        return random.SystemRandom().randrange(2**31)
    if chosen:
        return int(chosen)
    return zlib.crc32(node_id.encode())


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """This test's seed; torch's and Python's global generators are seeded with it too."""
    value = seed_of(request.node.nodeid)
    request.node.user_properties.append(("seed", value))
    torch.manual_seed(value)
    random.seed(value)
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [value for name, value in item.user_properties if name == "seed"]
        if seeds:
            report.sections.append(("seed", f"{ENV_TEST_SEED}={seeds[0]} reruns this test as it "
                                            "ran"))


@pytest.fixture
def value_checks_on(monkeypatch):
    """Index-value checks on every device: on a GPU they are off by default (each costs a host
    sync), and bad-input tests must see the ValueError there too."""
    monkeypatch.setenv("SPHINX_KERNELS_CHECK_INPUTS", "1")


@pytest.fixture
def index_reads(monkeypatch):
    """A function giving the number of index tensors the kernels' value checks have read back to
    the host so far (every value check goes through ``sphinx_kernels._validation.host_values``),
    from an empty memory of passed checks: counts that do not depend on the tests run before."""
    import sys

    from sphinx_kernels import _validation

    count = [0]
    original = _validation.host_values
    monkeypatch.setattr(_validation, "_CHECKED", {})

    def counting(values):
        count[0] += 1
        return original(values)

    for name, module in list(sys.modules.items()):
        if name.startswith("sphinx_kernels") and getattr(module, "host_values", None) is original:
            monkeypatch.setattr(module, "host_values", counting)
    return lambda: count[0]
