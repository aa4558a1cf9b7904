# Sourced by scripts/run.sh and scripts/test.sh: makes .venv at the repository root, installs what is
# missing, (re)builds sphinx_kernels._C when its sources changed, and activates the environment.
#
# Works offline on a machine that already has a suitable CUDA torch (a GPU box): the venv then sees the
# system packages and nothing already importable is installed again.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"

torch_ok='import sys, torch; v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 5))'

if [ ! -x "$VENV/bin/python" ]; then
    if "$PYTHON" -c "$torch_ok" 2>/dev/null; then
        echo "setup: using the torch already installed for $PYTHON"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
    fi
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

pip_install() { python -m pip install --disable-pip-version-check -q "$@"; }

if ! python -c "$torch_ok" 2>/dev/null; then
    echo "setup: installing torch (a CUDA build where the platform has one; several GB)"
    pip_install 'torch>=2.5'
fi
# Import name -> distribution name, installed only when the import fails (no network needed otherwise):
# the kernels' build and run, the model extra, the demo data, the tests' peers and linter, the
# benchmark plots.
missing=()
for pair in triton:triton numpy:numpy ninja:ninja setuptools:'setuptools>=64' wheel:wheel \
            timm:'timm>=1.0.20' safetensors:safetensors tokenizers:tokenizers sentencepiece:sentencepiece \
            PIL:pillow tqdm:tqdm yaml:pyyaml skimage:scikit-image mistral_common:mistral-common \
            pytest:pytest hypothesis:hypothesis transformers:'transformers>=5' ruff:ruff \
            matplotlib:matplotlib; do
    python -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
# torchvision (timm needs it) must be the build made for the installed torch: pin torch beside it.
if ! python -c "import torchvision" 2>/dev/null; then
    missing+=(torchvision "torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])')")
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    pip_install "${missing[@]}"
fi

# CUDA toolkit for the extension build: CUDA_HOME, else ask nvcc where it lives (it may be a wrapper script).
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
    top="$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
    [ -n "$top" ] && [ -d "$top" ] && export CUDA_HOME="$(cd "$top" && pwd)"
fi

# Build (or rebuild) the compiled extension when it is missing or older than its sources.
so="$(ls "$ROOT"/sphinx_kernels/_C*.so 2>/dev/null | head -n 1 || true)"
if [ -z "$so" ] || [ -n "$(find "$ROOT/csrc" "$ROOT/setup.py" -newer "$so" -print -quit)" ]; then
    echo "setup: building sphinx_kernels._C (a few minutes on 2 cores)"
    if python -c 'import importlib.metadata as m; m.version("sphinx-kernels")' 2>/dev/null; then
        (cd "$ROOT" && python setup.py -q build_ext --inplace)
    else
        (cd "$ROOT" && python -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e .)
    fi
fi
