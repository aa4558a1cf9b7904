"""Builds sphinx_kernels._C: the C++ CPU kernels when a C++ compiler is found, the CUDA kernels too
when torch is a CUDA build and a CUDA toolkit is found. Without a compiler the install succeeds
without the extension, and without a toolkit without the CUDA kernels (the Triton and reference
backends need neither), each saying why in one line. A compiler or toolkit that is there but fails
(a broken source, a broken toolkit) fails the install.

Environment: CUDA_HOME (else the toolkit behind `nvcc` on the PATH), TORCH_CUDA_ARCH_LIST (default
"8.0;9.0"), MAX_JOBS (parallel compile jobs), CXX (the C++ compiler, default c++),
SPHINX_KERNELS_NO_CUDA=1 (build the CPU kernels only), SPHINX_KERNELS_REQUIRE_EXTENSION=1 (fail
rather than install without the extension: CI).
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def find_cuda_home():
    """The CUDA toolkit root (holding bin/nvcc and lib64/libcudart*), or None."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    # `nvcc` may be a wrapper script outside the toolkit: ask the real one where it lives.
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        for line in (dry.stderr + dry.stdout).splitlines():
            if line.startswith("#$ TOP="):
                return os.path.realpath(line[len("#$ TOP="):].strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def say(message):
    print(f"sphinx-kernels: {message}", file=sys.stderr, flush=True)


def without_extension(why):
    """No extension: fine for a user (the Triton and reference backends serve), an error for CI."""
    if os.environ.get("SPHINX_KERNELS_REQUIRE_EXTENSION"):
        raise SystemExit(f"sphinx-kernels: SPHINX_KERNELS_REQUIRE_EXTENSION is set, but {why}")
    say(f"{why}; installing without sphinx_kernels._C")
    return [], {}


def extension_modules():
    try:
        import torch  # the build needs the torch it will run with: pip install --no-build-isolation
    except ImportError:
        return without_extension("torch is not importable at build time")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return without_extension(f"no C++ compiler ({compiler!r} is not on the PATH; set CXX)")
    cuda_home = None
    if torch.version.cuda and not os.environ.get("SPHINX_KERNELS_NO_CUDA"):
        cuda_home = find_cuda_home()
        if cuda_home:
            os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    # -fopenmp: at::parallel_for is inlined from ATen's OpenMP header and runs serially without it.
    cxx = ["-O3", "-fopenmp"]
    link = ["-fopenmp"]
    if cuda_home:
        nvidia_include = _nvidia_wheel_include()
        if nvidia_include and not os.path.exists(os.path.join(cuda_home, "include", "cublas_v2.h")):
            # torch's CUDA headers include cuBLAS/cuSPARSE headers this toolkit lacks; the nvidia
            # wheels that came with torch have them. -idirafter: never shadow the toolkit's own.
            cxx += ["-idirafter", nvidia_include]
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        ext = cpp_extension.CUDAExtension(
            "sphinx_kernels._C",
            sources + sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)),
            define_macros=[("SPHINX_KERNELS_WITH_CUDA", None),
                           ("SPHINX_KERNELS_CUDA_ARCHS", f'"{archs}"')],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo", "-std=c++17"]},
            extra_link_args=link,
        )
        say(f"building C++ CPU and CUDA kernels (CUDA_HOME={cuda_home}, archs {archs})")
    else:
        why = ("torch is a CPU build" if not torch.version.cuda else
               "SPHINX_KERNELS_NO_CUDA is set" if os.environ.get("SPHINX_KERNELS_NO_CUDA") else
               "no CUDA toolkit found (set CUDA_HOME or put nvcc on the PATH)")
        say(f"building C++ CPU kernels only: {why}")
        ext = cpp_extension.CppExtension("sphinx_kernels._C", sources,
                                         extra_compile_args={"cxx": cxx}, extra_link_args=link)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=bool(shutil.which("ninja")))
    return [ext], {"build_ext": _explained(build_ext)}


def _nvidia_wheel_include():
    import importlib.util
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations if spec else []):
        for candidate in sorted(glob.glob(os.path.join(base, "cu*", "include"))):
            return candidate
    return None


def _explained(build_ext):
    """build_ext whose failure says what to do: a compile that fails is a broken source or toolkit,
    never a reason to install without the kernels."""

    class ExplainedBuildExt(build_ext):
        def run(self):
            try:
                super().run()
            except Exception:
                say("building sphinx_kernels._C failed (the error is above). A toolkit that cannot "
                    "build CUDA here can be left out with SPHINX_KERNELS_NO_CUDA=1.")
                raise

    return ExplainedBuildExt


ext_modules, cmdclass = extension_modules()
setup(
    packages=find_packages(include=["sphinx_kernels", "sphinx_kernels.*",
                                    "sphinx_model", "sphinx_model.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
