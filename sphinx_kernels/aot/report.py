"""The check's results as markdown tables (the generated section of ``docs/launchability.md``) and
as JSON (what the test reads).

The markdown holds no time, date or commit, so that it changes only when a kernel, a launcher's
configuration or the toolchain does; its header names the toolchain versions the numbers are from.
"""
from __future__ import annotations

import os

from sphinx_kernels.aot import policy
from sphinx_kernels.aot.check import ROOT, Results, Row
from sphinx_kernels.aot.record import TARGETS, Launch

DOC = os.path.join(ROOT, "docs", "launchability.md")
BEGIN, END = "<!-- launchability:begin -->", "<!-- launchability:end -->"


def config(launch: Launch) -> str:
    """The constexprs, warps and stages of a launch, compactly."""
    parts = [f"{name}={_value(launch.constant(name))}" for name, kind in launch.signature.items()
             if kind == "constexpr"]
    return " ".join(parts + [f"warps={launch.options['num_warps']}",
                             f"stages={launch.options['num_stages']}"])


def _value(value) -> str:
    if isinstance(value, tuple):
        return "(" + ",".join(_value(v) for v in value) + ")"
    if isinstance(value, bool):
        return "T" if value else "F"
    return str(value).removeprefix("tl.")


def _dots(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items())) or "-"


def _spills(row: Row) -> str:
    m = row.measurement
    if m.stopped or m.error:
        return "-"
    return f"{m.spill_stores}/{m.spill_loads}" if m.spills else "0"


def _verdict(row: Row) -> str:
    if not row.violations:
        return "ok"
    return "; ".join(f"**{v.rule}**" if v.excused_by is None else f"{v.rule} (exempt)"
                     for v in row.violations)


def summary_line(row: Row) -> str:
    """One specialisation on one line (``--only``): target, kernel, dtypes, numbers, config."""
    m = row.measurement
    registers = "-" if m.stopped or m.error else m.registers
    return (f"{row.target.name} {row.launch.name} {'/'.join(row.launch.dtypes)}: smem {m.shared}"
            f" regs {registers} spills {_spills(row)} dots {_dots(m.dots)} {m.seconds:.1f} s"
            f" [{config(row.launch)}] {_verdict(row)}"
            f"{' ' + (m.error or m.stopped) if m.error or m.stopped else ''}")


def _kernel(launch: Launch) -> str:
    return f"`{launch.name}`"


def _by_kernel(results: Results) -> list[str]:
    """Per kernel and dtype: the largest shared memory, registers and spills over its
    specialisations, on each target (registers and spills of those that reached ptxas)."""
    groups: dict[tuple[str, str], dict[str, list[Row]]] = {}
    kernels = list(dict.fromkeys(row.launch.name for row in results.rows))
    rows = sorted(results.rows, key=lambda r: (kernels.index(r.launch.name), r.launch.dtypes))
    for row in rows:
        key = (row.launch.name, "/".join(row.launch.dtypes))
        groups.setdefault(key, {}).setdefault(row.target.name, []).append(row)
    head = "| kernel | dtype | specs |"
    rule = "| --- | --- | ---: |"
    for target in TARGETS:
        head += f" {target.name} smem B | regs | spills B | 16-bit dots |"
        rule += " ---: | ---: | ---: | --- |"
    lines = [head + " verdict |", rule + " --- |"]
    for (kernel, dtypes), by_target in groups.items():
        count = max(len(rows) for rows in by_target.values())
        line = f"| `{kernel}` | {dtypes} | {count} |"
        verdicts = []
        for target in TARGETS:
            rows = by_target.get(target.name, [])
            compiled = [r.measurement for r in rows if r.measurement.error is None]
            assembled = [m for m in compiled if m.stopped is None]
            dots: dict[str, int] = {}
            for m in compiled:
                for kind, n in m.dots.items():
                    dots[kind] = max(dots.get(kind, 0), n)
            line += (f" {max((m.shared for m in compiled), default='-')} |"
                     f" {max((m.registers for m in assembled), default='-')} |"
                     f" {max((m.spills for m in assembled), default='-')} | {_dots(dots)} |")
            failed = sorted({v.rule for r in rows for v in r.failed})
            if failed:
                verdicts.append(f"{target.name}: **{', '.join(failed)}**")
        lines.append(line + f" {'; '.join(verdicts) or 'ok'} |")
    return lines


def _violations(results: Results) -> list[str]:
    rows = [(row, v) for row in results.rows for v in row.violations]
    if not rows:
        return ["None."]
    lines = ["| kernel | dtype | target | rule | measured | config | workloads | exempt because |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row, v in rows:
        lines.append(f"| {_kernel(row.launch)} | {'/'.join(row.launch.dtypes)} | "
                     f"{row.target.name} | {v.rule} | {v.detail} | {config(row.launch)} | "
                     f"{'; '.join(row.launch.cases)} | "
                     f"{v.excused_by.reason if v.excused_by else ''} |")
    return lines


def _specialisations(results: Results, target_name: str) -> list[str]:
    lines = [("| kernel | dtype | config | smem B | regs | spills B (st/ld) | 16-bit dots | "
              "ptxas notes | verdict | workloads |"),
             "| --- | --- | --- | ---: | ---: | ---: | --- | --- | --- | --- |"]
    for row in results.rows:
        if row.target.name != target_name:
            continue
        m = row.measurement
        notes = m.error or m.stopped or "; ".join(m.warnings)
        registers = "-" if m.stopped or m.error else m.registers
        lines.append(f"| {_kernel(row.launch)} | {'/'.join(row.launch.dtypes)} | "
                     f"{config(row.launch)} | {m.shared} | {registers} | {_spills(row)} | "
                     f"{_dots(m.dots)} | {notes.replace('|', '/')} | {_verdict(row)} | "
                     f"{'; '.join(row.launch.cases)} |")
    return lines


def _cuda(results: Results) -> list[str]:
    if not results.cuda and not results.cuda_errors:
        return ["Not measured (no nvcc)."]
    kernels: dict[tuple[str, str], dict[str, object]] = {}
    for k in results.cuda:
        kernels.setdefault((k.source, k.name), {})[k.target] = k
    head = "| source | kernel |"
    rule = "| --- | --- |"
    for target in TARGETS:
        head += f" {target.name} regs | spills B | static smem B |"
        rule += " ---: | ---: | ---: |"
    lines = [head, rule]
    for (source, name), by_target in kernels.items():
        line = f"| `{source}` | `{name}` |"
        for target in TARGETS:
            k = by_target.get(target.name)
            line += f" {k.registers} | {k.spills} | {k.shared} |" if k else " | | |"
        lines.append(line)
    return lines + [f"\nnvcc failed: {e}" for e in results.cuda_errors]


def _exemptions() -> list[str]:
    if not policy.EXEMPTIONS:
        return ["None."]
    return [f"- `{e.kernel}`{' ' + e.dtype if e.dtype else ''}"
            f"{' on ' + e.target if e.target else ''}"
            f"{''.join(f' at {name}={_value(value)}' for name, value in e.where)}, "
            f"{e.rule}: {e.reason}"
            for e in policy.EXEMPTIONS]


def markdown(results: Results) -> str:
    """The generated section (between the markers)."""
    env = results.environment
    kernels = {row.launch.name for row in results.rows}
    failures = results.failures
    targets = ", ".join(f"{t.name} ({t.gpu}, {t.shared_per_block} B shared memory per block)"
                        for t in TARGETS)
    toolchain = (f"Toolchain: torch {env['torch']}, triton {env['triton']}, ptxas {env['ptxas']}; "
                 f"nvcc {env['nvcc'] or 'not found'}. Targets: {targets}.")
    per_target = ", ".join(f"{sum(r.target == t for r in results.rows)} on {t.name}"
                           for t in TARGETS)
    exempt = sum(v.excused_by is not None for r in results.rows for v in r.violations)
    summary = (f"Specialisations of {len(kernels)} Triton kernels: {per_target}; "
               f"{len(failures)} violations without an exemption, {exempt} exempt"
               + (f", {len(results.cuda_spills)} CUDA kernels that spill" if results.cuda else "")
               + ".")
    lines = [toolchain, "", summary, "",
             "### By kernel and dtype (largest over the specialisations)", "",
             *_by_kernel(results), "", "### Violations", "", *_violations(results), "",
             "### Exemptions", "", *_exemptions(), "", "### CUDA sources (nvcc -Xptxas -v)", "",
             *_cuda(results)]
    for target in TARGETS:
        lines += ["", f"### Every specialisation on {target.name}", "",
                  *_specialisations(results, target.name)]
    return "\n".join(lines) + "\n"


def replace_section(text: str, section: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{section}{END}{tail}"


def to_json(results: Results) -> dict:
    rows = [{"kernel": r.launch.name, "module": r.launch.module, "target": r.target.name,
             "dtypes": r.launch.dtypes, "cases": r.launch.cases, "config": config(r.launch),
             "grid": r.launch.grid, "measurement": r.measurement.to_dict(),
             "violations": [{"rule": v.rule, "detail": v.detail, "exempt": v.excused_by is not None}
                            for v in r.violations]}
            for r in results.rows]
    return {"environment": results.environment, "ok": results.ok, "seconds": results.seconds,
            "timings": results.timings, "rows": rows, "cuda": [k.to_dict() for k in results.cuda],
            "cuda_errors": results.cuda_errors}
