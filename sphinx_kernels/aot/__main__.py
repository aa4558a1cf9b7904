"""``python -m sphinx_kernels.aot [--jobs N] [--check] [--json PATH] [--only TEXT]``: the
launchability check.

Records every Triton launch of the public ops at SPHINX-X sizes, compiles each specialisation for
sm_90 and sm_80 (and the CUDA sources with nvcc), writes the tables into ``docs/launchability.md``
(``--check``: compares instead, and fails when the file is stale) and ``--json`` the results.
``--only TEXT`` checks just the kernels whose ``<op>.<kernel>`` name contains TEXT and prints every
specialisation's numbers instead of touching the document (for tuning a launcher).

Exit status: the sum of 1 when a specialisation breaks a rule of ``sphinx_kernels.aot.policy`` (no
exemption covering it) or a CUDA kernel spills, and 2 when ``--check`` finds the document stale.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from sphinx_kernels.aot import report
from sphinx_kernels.aot.check import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sphinx_kernels.aot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--check", action="store_true",
                        help=f"compare the generated section of {report.DOC} instead of writing it")
    parser.add_argument("--json", help="write the results there as JSON")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA sources")
    parser.add_argument("--only", metavar="TEXT",
                        help="just the kernels whose <op>.<kernel> name contains TEXT; prints "
                             "their numbers, leaves the document alone (implies --no-cuda)")
    args = parser.parse_args(argv)
    results = run(jobs=args.jobs, cuda=not (args.no_cuda or args.only), only=args.only)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_json(results), f, indent=1)
    status = 0
    if args.only:
        for row in results.rows:
            print(report.summary_line(row))
        return _print_totals(results)
    section = report.markdown(results)
    current = ""
    if os.path.exists(report.DOC):
        with open(report.DOC) as f:
            current = f.read()
    if args.check:
        if report.replace_section(current, section) != current:
            print(f"{report.DOC} is stale: run python -m sphinx_kernels.aot", file=sys.stderr)
            status = 2
    else:
        with open(report.DOC, "w") as f:
            f.write(report.replace_section(current, section))
    return status + _print_failures(results)


def _print_failures(results) -> int:
    for row, violation in results.failures:
        print(f"{row.target.name} {row.launch.name} {'/'.join(row.launch.dtypes)}: "
              f"{violation.rule}: {violation.detail} [{report.config(row.launch)}]")
    for kernel in results.cuda_spills:
        print(f"{kernel.target} {kernel.source} {kernel.name}: spills {kernel.spills} B")
    for error in results.cuda_errors:
        print(error)
    return _print_totals(results)


def _print_totals(results) -> int:
    """The counts and times; the exit status of the rules (1: a violation without exemption)."""
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in results.timings.items())
    print(f"{len(results.rows)} compiles, {len(results.failures)} violations, "
          f"{results.seconds:.0f} s ({timings})")
    return 0 if results.ok else 1


if __name__ == "__main__":
    sys.exit(main())
