"""examples/hf_padding_free.py runs (it uses only the public API), and its packed sphinx_varlen
training follows transformers' padded sdpa training loss for loss, both models learning."""
import pathlib
import re
import runpy

import pytest

pytest.importorskip("transformers", minversion="5.0")

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "hf_padding_free.py"
STEP = re.compile(r"step \d+: loss ([\d.]+) \(sphinx_varlen, packed\)  ([\d.]+) \(sdpa, padded\)")


def test_example_trains_llama_and_mixtral_like_padded_sdpa(capsys, reference_ops):
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    for name in ("llama", "mixtral"):
        section = out.split(f"{name}:")[1].split("\n\n")[0]
        losses = [(float(a), float(b)) for a, b in STEP.findall(section.split(":", 1)[1])]
        assert len(losses) >= 3, out
        assert all(abs(a - b) <= 2e-5 for a, b in losses), out
        assert losses[-1][0] < losses[0][0] - 0.1, f"{name} did not learn: {out}"
