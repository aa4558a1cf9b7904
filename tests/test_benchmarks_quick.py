"""Every benchmark family runs end to end on this machine in --quick mode, as the main job runs it
(a fresh process without TRITON_INTERPRET, so the Triton interpreter is not timed), and a broken
benchmark fails CI rather than the next GPU session: the run succeeds and writes its rows where
asked."""
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.__main__ import FAMILIES
from benchmarks.harness import results_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quick_run_writes_its_rows(family, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--family", family, "--quick",
                           "--results-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(results_path(family, torch.device("cpu"), True, results_dir=str(tmp_path))) as f:
        rows = json.load(f)["rows"]
    assert rows and all(row["ms"] > 0 for row in rows)
