"""The backend registry: per-call selection, forcing by argument and environment, and errors that
list every backend's reasons."""
import shutil
from dataclasses import dataclass, fields

import pytest
import torch

import sphinx_kernels
from sphinx_kernels import info
from sphinx_kernels.backends import (
    ENV_BACKEND,
    Backend,
    BackendUnavailableError,
    Impl,
    OpBackends,
    Request,
)
from sphinx_kernels.ops.gather_rows import GATHER_ROWS_BACKENDS
from sphinx_kernels.platforms import CPP, CUDA, REFERENCE, TRITON, native_extension

CPU_FP32 = GATHER_ROWS_BACKENDS.request("cpu", torch.float32)


def test_forcing_a_backend_that_cannot_serve_lists_every_backend():
    sources, source_ids, row_ids = [torch.randn(4, 3)], torch.tensor([0, 0]), torch.tensor([1, 2])
    with pytest.raises(BackendUnavailableError) as caught:
        sphinx_kernels.gather_rows(sources, source_ids, row_ids, backend="cuda")
    message = str(caught.value)
    assert ("gather_rows: backend 'cuda' cannot serve this call (device=cpu, dtype=float32)"
            in message)
    for name in GATHER_ROWS_BACKENDS.names:
        assert f"\n  {name}: " in message
    assert "cuda: runs on cuda, not cpu" in message
    assert "reference: available" in message
    assert isinstance(caught.value, ValueError)


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv(ENV_BACKEND, "reference")
    assert GATHER_ROWS_BACKENDS.select(CPU_FP32).name == "reference"
    monkeypatch.setenv(ENV_BACKEND, "varlen_attention=triton, gather_rows=reference")
    assert GATHER_ROWS_BACKENDS.select(CPU_FP32).name == "reference"
    monkeypatch.setenv(ENV_BACKEND, "varlen_attention=triton")  # another op's setting: no effect
    assert GATHER_ROWS_BACKENDS.select(CPU_FP32).name == GATHER_ROWS_BACKENDS.select(
        CPU_FP32, None).name
    monkeypatch.setenv(ENV_BACKEND, "cuda")
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot serve"):
        GATHER_ROWS_BACKENDS.select(CPU_FP32)


def test_argument_overrides_environment(monkeypatch):
    monkeypatch.setenv(ENV_BACKEND, "cuda")
    assert GATHER_ROWS_BACKENDS.select(CPU_FP32, "reference").name == "reference"


def test_unknown_backend_name_is_reported_with_the_known_ones(monkeypatch):
    with pytest.raises(BackendUnavailableError, match="unknown backend 'cudnn' .*cuda, cpp"):
        GATHER_ROWS_BACKENDS.select(CPU_FP32, "cudnn")
    monkeypatch.setenv(ENV_BACKEND, "cudnn")
    with pytest.raises(BackendUnavailableError, match=f"from {ENV_BACKEND}"):
        GATHER_ROWS_BACKENDS.select(CPU_FP32)


def test_first_supporting_backend_in_priority_order_is_chosen():
    supporting = [b.name for b in GATHER_ROWS_BACKENDS.backends
                  if not b.not_supported_reasons(CPU_FP32)]
    assert GATHER_ROWS_BACKENDS.select(CPU_FP32).name == supporting[0]
    if native_extension() is not None:
        assert supporting[0] == "cpp"


@pytest.mark.parametrize("interpreted", ("1", None))
def test_supports_agrees_with_the_reasons(monkeypatch, interpreted):
    """Selection asks the cheap ``supports``; errors and ``info`` print ``not_supported_reasons``:
    for every backend of every op, on both device kinds, every dtype and every value of each
    request feature, they must agree."""
    if interpreted:
        monkeypatch.setenv("TRITON_INTERPRET", interpreted)
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32,
              torch.int64)
    checked = 0
    for table, _ in info.OPS:
        defaults = table.request("cpu", torch.float32)
        variants = [{}]
        for field in fields(defaults)[2:]:  # every feature flipped (bools) or made extreme (ints)
            value = getattr(defaults, field.name)
            variants.append({field.name: (not value) if isinstance(value, bool) else 512})
        for device in ("cpu", "cuda"):
            # Without a GPU, a platform that would ask for the capability cannot be asked.
            backends = [b for b in table.backends if device == "cpu" or torch.cuda.is_available()
                        or b.platform.min_capability is None]
            for dtype in dtypes:
                for features in variants:
                    request = table.request(device, dtype, **features)
                    for backend in backends:
                        assert backend.supports(request) == (
                            not backend.not_supported_reasons(request)), (backend.name, request)
                        checked += 1
    assert checked > 500


@dataclass(frozen=True)
class ToyRequest(Request):
    head_dim: int = 64


def toy_op() -> OpBackends:
    def head_dim_check(request):
        return [] if request.head_dim <= 128 else ["head_dim above 128"]

    return OpBackends("toy", [
        Backend(CUDA, Impl(None), frozenset({torch.float16})),
        Backend(REFERENCE, Impl(None), frozenset({torch.float16}), check=head_dim_check),
    ], request_type=ToyRequest)


def test_no_backend_at_all_lists_dtype_and_op_specific_reasons():
    op = toy_op()
    request = op.request("cpu", torch.float32, head_dim=256)
    with pytest.raises(BackendUnavailableError) as caught:
        op.select(request)
    message = str(caught.value)
    assert ("toy: no backend can serve this call (device=cpu, dtype=float32, head_dim=256)"
            in message)
    assert "reference: dtype float32 not in {float16}; head_dim above 128" in message


def test_a_misspelled_feature_or_a_foreign_request_is_an_error():
    op = toy_op()
    with pytest.raises(TypeError, match="head_dims"):
        op.request("cpu", torch.float16, head_dims=64)
    with pytest.raises(TypeError, match="toy takes a ToyRequest"):
        op.select(Request(torch.device("cpu"), torch.float16))
    with pytest.raises(TypeError, match="toy takes a ToyRequest"):
        op.reasons(CPU_FP32)


def test_backend_names_must_be_unique():
    with pytest.raises(ValueError, match="unique"):
        OpBackends("toy", [Backend(CPP, Impl(None), frozenset()),
                           Backend(CPP, Impl(None), frozenset())])


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    backend = Backend(TRITON, Impl(None), frozenset({torch.float32}))
    reasons = backend.not_supported_reasons(CPU_FP32)
    assert any("TRITON_INTERPRET=1" in r for r in reasons)


def test_info_reports_build_and_backends():
    text = info.report()
    assert "torch" in text and "_C" in text and "gather_rows / cpu:" in text
    assert ("gpu            none" in text) == (not torch.cuda.is_available())


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="no C++ compiler: the package installs without _C")
def test_compiled_extension_is_built():
    assert native_extension() is not None, "sphinx_kernels._C did not build"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("sphinx_kernels::gather_rows_native",
                                                          "CPU")


@pytest.mark.skipif(not torch.version.cuda or shutil.which("nvcc") is None,
                    reason="CPU torch or no CUDA toolkit: the CUDA kernels are not built")
def test_cuda_kernels_are_built_where_the_toolkit_allows():
    ext = native_extension()
    assert ext is not None and ext.with_cuda, "CUDA torch and nvcc are here, yet _C has no CUDA"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("sphinx_kernels::gather_rows_native",
                                                          "CUDA")
