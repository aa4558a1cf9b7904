"""One PNG per family: throughput against size, one line per backend (and dtype), one panel per op.

matplotlib is optional (``pip install matplotlib``, or the ``bench`` extra); without it the results
files are still written and the plot is skipped with a message saying so.
"""
from __future__ import annotations

import os
from typing import Sequence


def _x_axis(rows) -> tuple[list[float], list[str] | None]:
    """The rows' sizes when every row has one, else positions of the distinct shapes in run
    order."""
    if all(r.size is not None for r in rows):
        return [r.size for r in rows], None
    shapes = list(dict.fromkeys(r.shape for r in rows))
    return [float(shapes.index(r.shape)) for r in rows], shapes


def plot_family(family: str, rows: Sequence, path: str, title: str) -> str:
    """Draws ``rows`` (harness ``Row`` objects) to ``path``; returns the path, or why no plot was
    made."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    ops = list(dict.fromkeys(r.op for r in rows))
    if not ops:
        return "plot skipped: no rows"
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), squeeze=False)
    for ax, op in zip(axes[0], ops):
        op_rows = [r for r in rows if r.op == op]
        xs, labels = _x_axis(op_rows)
        compute = any(r.tflops is not None for r in op_rows)
        for line in dict.fromkeys((r.backend, r.dtype) for r in op_rows):
            points = sorted((x, r.tflops if compute else r.gbps) for x, r in zip(xs, op_rows)
                            if (r.backend, r.dtype) == line)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    label=f"{line[0]} ({line[1]})")
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=7)
        else:
            ax.set_xscale("log")
            ax.set_xlabel("size")
        ax.set_ylabel("TFLOP/s" if compute else "GB/s")
        ax.set_title(op)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
