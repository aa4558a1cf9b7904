"""What the trainer measures and writes: FLOPs and MFU, the per-step JSONL log, the loss plot.

FLOPs are counted per step from what was actually computed: the decoder over every packed row
(``6 * active parameters`` per row for forward and backward, attention over the causal pairs of each
sample, the LM head only at labelled rows, where the chunked loss computes it), the frozen vision
encoders forward only, once per kept view. MFU divides by the device's dense bf16 peak (only known
GPUs; ``None`` elsewhere).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from sphinx_model.config import LLMConfig

__all__ = ["MetricsLog", "decoder_flops", "peak_flops", "plot_loss"]

# Dense bf16 tensor-core peaks (FLOP/s), from the vendors' data sheets, by device-name substring.
_PEAK_BF16 = (("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12),
              ("A800", 312e12), ("L40S", 362e12), ("A10G", 70e12))


def peak_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of ``device`` in FLOP/s, or None when unknown (the CPU, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _PEAK_BF16 if key in name), None)


def decoder_flops(llm: LLMConfig, rows: int, causal_pairs: int, labelled_rows: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) of the decoder on one step.

    ``rows``: packed rows; ``causal_pairs``: sum over samples of ``L * (L + 1) / 2``;
    ``labelled_rows``: rows where the LM head and loss are computed.
    """
    hidden, heads, kv_heads, head_dim = (llm.hidden_size, llm.num_heads, llm.num_kv_heads,
                                         llm.dim_per_head)
    attention_params = hidden * head_dim * (2 * heads + 2 * kv_heads)
    experts = llm.top_k if llm.num_experts else 1
    mlp_params = 3 * hidden * llm.intermediate_size * experts + hidden * llm.num_experts
    per_row = 2 * llm.num_layers * (attention_params + mlp_params)
    attention = 4 * llm.num_layers * heads * head_dim * causal_pairs  # QK^T and PV
    head = 2 * hidden * llm.vocab_size * labelled_rows
    return 3.0 * (per_row * rows + attention + head)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per optimizer step, appended and flushed as it happens. On
    resume, the lines of steps past the resumed one (written after that checkpoint) are dropped."""

    def __init__(self, path: str | os.PathLike, resume_after: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in self.read(self.path) if resume_after is not None
                and r.get("step", 0) <= resume_after]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    @staticmethod
    def read(path: str | os.PathLike) -> list[dict[str, Any]]:
        path = Path(path)
        if not path.is_file():
            return []
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


def plot_loss(records: Iterable[dict[str, Any]], png: str | os.PathLike) -> bool:
    """Draws the loss curve (and a moving average) to ``png``; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    points = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    if not points:
        return False
    steps, losses = zip(*points)
    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(steps, losses, color="#9bb7d4", linewidth=0.8, label="loss")
    ax.plot(steps, smooth, color="#1f4e79", linewidth=1.6, label=f"mean of {window}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per trained token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return True
