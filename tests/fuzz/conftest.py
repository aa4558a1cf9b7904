"""The fuzz suite's session summary: the cases run per op and backend (valid, invalid, and unchecked
index values that reach the kernels past validation, as on a GPU), and, when the whole suite ran
(every tests/fuzz/test_*.py module, nothing deselected, every test passed), the floor of issue 13:
at least ``MIN_VALID`` valid and ``MIN_INVALID`` invalid cases, else the session fails."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz.harness import CASES

MIN_VALID = 1000
MIN_INVALID = 1000
HERE = Path(__file__).resolve().parent
_STATE = {"deselected": False, "failed": False}


def _in_suite(item) -> bool:
    return Path(str(item.fspath)).resolve().parent == HERE


def pytest_deselected(items):
    if any(_in_suite(item) for item in items):
        _STATE["deselected"] = True


def pytest_runtest_logreport(report):
    if report.failed and Path(report.fspath).resolve().parent == HERE:
        _STATE["failed"] = True


def _whole_suite(session) -> bool:
    modules = {p.resolve() for p in HERE.glob("test_*.py")}
    collected = {Path(str(item.fspath)).resolve() for item in session.items if _in_suite(item)}
    return collected == modules and not _STATE["deselected"]


def totals() -> dict[str, int]:
    found = {"valid": 0, "invalid": 0}
    for (kind, _, _), count in CASES.items():
        found[kind] = found.get(kind, 0) + count
    return found


def pytest_sessionfinish(session, exitstatus):
    if _whole_suite(session) and not _STATE["failed"] and exitstatus == 0:
        found = totals()
        if found["valid"] < MIN_VALID or found["invalid"] < MIN_INVALID:
            _STATE["short"] = (f"fuzz suite: {found['valid']} valid and {found['invalid']} invalid "
                               f"cases, below the floor of {MIN_VALID} and {MIN_INVALID}")
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if not CASES:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fuzz cases")
    ops = sorted({op for _, op, _ in CASES})
    for op in ops:
        per_backend = {kind: ", ".join(f"{backend} {count}" for (k, o, backend), count
                                       in sorted(CASES.items()) if k == kind and o == op) or "-"
                       for kind in ("valid", "unchecked")}
        invalid = sum(count for (kind, o, _), count in CASES.items() if kind == "invalid"
                      and o == op)
        write(f"{op:22} valid: {per_backend['valid']}; invalid: {invalid}; unchecked indices: "
              f"{per_backend['unchecked']}")
    found = totals()
    write(f"{'total':22} valid: {found['valid']}; invalid: {found['invalid']}; unchecked "
          f"indices: {found.get('unchecked', 0)}")
    if "short" in _STATE:
        terminalreporter.write_line(_STATE["short"], red=True)
