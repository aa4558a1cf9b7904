"""The kernel package does not depend on transformers: importing sphinx_kernels, its
integrations package and the transformers integration module never imports transformers, and
with transformers missing the integration says what to install when used. Run in a fresh
interpreter with transformers made unimportable."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = """
import sys

import sphinx_kernels
import sphinx_kernels.integrations
from sphinx_kernels.integrations import transformers as skt
assert "transformers" not in sys.modules, "importing sphinx_kernels imported transformers"

sys.modules["transformers"] = None  # from here on, `import transformers` fails as if missing
for call in (skt.register, lambda: skt.use_sphinx_moe(None), lambda: skt.undo_sphinx_moe(None)):
    try:
        call()
    except ImportError as error:
        assert "needs Hugging Face transformers >= 5" in str(error), error
        assert "pip install" in str(error), error
    else:
        raise AssertionError("no ImportError without transformers")
print("ok")
"""


def test_sphinx_kernels_imports_and_explains_without_transformers():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, check=False,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
