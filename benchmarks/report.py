"""``python -m benchmarks.report [--check]``: the benchmark tables of ``docs/benchmarks.md``,
generated from the published results files (``benchmarks/results/*.json``, quick runs excluded).

The tables go between the ``<!-- benchmarks:begin -->`` and ``<!-- benchmarks:end -->`` lines of
that page; ``--check`` exits with status 1 when the page is not what the results files give (a test
runs it), so no number reaches the docs by hand. A CPU run's table says it holds CPU smoke numbers.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from benchmarks.harness import RESULTS_DIR

TABLES = os.path.join(os.path.dirname(RESULTS_DIR), os.pardir, "docs", "benchmarks.md")
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
# Our kernels (and layers named "sphinx ..."); every other backend in a case (the reference, peers,
# eager chains) is a baseline.
OURS = ("cuda", "cpp", "triton")


def is_ours(backend: str) -> bool:
    return backend in OURS or backend.startswith("sphinx")


def _throughput(row: dict) -> str:
    if row.get("tflops") is not None:
        return f"{row['tflops']:.3g} TFLOP/s"
    if row.get("gbps") is not None:
        return f"{row['gbps']:.3g} GB/s"
    return ""


def _notes(row: dict) -> str:
    """The row's extra columns (tokens/s, peak memory, bins, ...), compactly."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in row.get("extra", {}).items() if v is not None)


def _ratios(row: dict, case_rows: list[dict]) -> str:
    """How many times faster ``row`` is than every baseline of its case (op, shape, dtype)."""
    if not is_ours(row["backend"]):
        return ""
    return ", ".join(f"{other['ms'] / row['ms']:.2f}x {other['backend']}" for other in case_rows
                     if not is_ours(other["backend"]))


def family_table(results: dict, png: str | None) -> list[str]:
    env, ceilings = results["environment"], results["ceilings"]
    smoke = (" (CPU smoke numbers: the GPU kernels are not timed)"
             if env["device"].startswith("CPU") else "")
    lines = [f"### {results.get('family', '?')}: {env['device']} ({env['date']}){smoke}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, commit "
             f"`{env['commit']}`. Measured ceilings: copy {ceilings['copy_gbps']:.0f} GB/s"
             + (f", matmul {ceilings['matmul_tflops']:.3g} TFLOP/s ({ceilings['matmul']})"
                if "matmul_tflops" in ceilings else "") + "."]
    if ceilings.get("suspect"):
        lines[-1] += " **Suspect run:** " + "; ".join(ceilings["suspect"]) + "."
    skipped = {n: w for n, w in results.get("peers", {}).items() if w != "available"}
    if skipped:
        lines[-1] += " Peers skipped: " + "; ".join(f"{n} ({w})" for n, w in skipped.items()) + "."
    lines += ["", "| op | case | dtype | backend | ms | throughput | of ceiling | speed-up over "
                  "| notes |",
              "| --- | --- | --- | --- | ---: | ---: | ---: | --- | --- |"]
    rows = results["rows"]
    for row in rows:
        case = [r for r in rows if (r["op"], r["shape"], r["dtype"]) ==
                (row["op"], row["shape"], row["dtype"])]
        frac = row.get("fraction_of_ceiling")
        lines.append(f"| `{row['op']}` | {row['shape']} | {row['dtype']} | `{row['backend']}` | "
                     f"{row['ms']:.3f} | {_throughput(row)} | "
                     f"{'' if frac is None else f'{frac:.0%}'} | {_ratios(row, case)} | "
                     f"{_notes(row)} |")
    if png:
        family = results.get("family", "")
        lines += ["", f"![{family}](../benchmarks/results/{os.path.basename(png)})"]
    return lines + [""]


def generate(results_dir: str = RESULTS_DIR) -> str:
    paths = sorted(p for p in glob.glob(os.path.join(results_dir, "*.json"))
                   if not p.endswith("-quick.json"))
    lines = []
    for path in paths:
        with open(path) as f:
            results = json.load(f)
        results.setdefault("family", os.path.basename(path).split("-")[0])
        png = path[:-len(".json")] + ".png"
        lines += family_table(results, png if os.path.exists(png) else None)
    return "\n".join(lines).rstrip("\n")


def replace_section(page: str, section: str) -> str:
    head, begin, rest = page.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"docs/benchmarks.md needs the lines {BEGIN} and {END} around the "
                         "generated tables")
    return f"{head}{BEGIN}\n{section}\n{END}{tail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true",
                        help="fail if docs/benchmarks.md is out of date")
    args = parser.parse_args(argv)
    with open(TABLES) as f:
        current = f.read()
    wanted = replace_section(current, generate())
    if args.check:
        if wanted != current:
            print("docs/benchmarks.md is out of date: run python -m benchmarks.report")
            return 1
        return 0
    if wanted != current:
        tmp = TABLES + ".tmp"
        with open(tmp, "w") as f:
            f.write(wanted)
        os.replace(tmp, TABLES)
    print("docs/benchmarks.md: " + ("updated" if wanted != current else "up to date"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
