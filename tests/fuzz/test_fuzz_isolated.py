"""The fuzz cases that can end the process (tests/fuzz/risky.py) in a fresh interpreter: a crash
there fails this test instead of ending the run. Its cases join the session's counts."""
from __future__ import annotations

import json

from tests.fuzz.harness import CASES
from tests.fuzz.risky import COUNTS
from tests.variants import run_isolated


def test_risky_cases_in_a_fresh_interpreter():
    output = run_isolated("tests.fuzz.risky", "main")
    line = next(line for line in output.splitlines() if line.startswith(COUNTS))
    for kind, op, backend, count in json.loads(line[len(COUNTS):]):
        CASES[kind, op, backend] += count
