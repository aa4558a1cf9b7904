"""The benchmark harness: FLOP and byte counts against hand-computed values, ceilings, results
files, plots and the tables of docs/benchmarks.md generated from the results."""
import json
import random

import pytest
import torch

from benchmarks import counts, harness, plots, report
from benchmarks.peers import PEERS, peer_status
from benchmarks.rows import bandwidth_row, compute_row, fill_fractions


def test_gemm_and_mlp_counts_by_hand():
    assert counts.gemm_flops(2, 3, 4) == 48
    # 3 GEMMs of 2 x 5 x 3: 3 * (2 * 2 * 5 * 3); the backward twice that.
    assert counts.swiglu_mlp_flops(2, 3, 5) == 180
    assert counts.swiglu_mlp_flops(2, 3, 5, backward=True) == 360
    # 2 views of 1 + 2*2 rows = 10 rows, 4 channels into 3: 2 * 10 * 3 * 4.
    assert counts.projection_flops(2, (2, 2), 4, 3) == 240
    assert counts.row_copy_bytes(10, 4, 2) == 160


def test_attention_pairs_by_hand():
    assert counts.attention_pairs([3], causal=True) == 6          # 1 + 2 + 3
    assert counts.attention_pairs([3], causal=False) == 9
    assert counts.attention_pairs([0, 1], causal=True) == 1
    assert counts.attention_pairs([2], [5], causal=True) == 9     # bottom-right: 4 + 5
    assert counts.attention_pairs([3], [1], causal=True) == 1     # 0 + 0 + 1
    assert counts.attention_pairs([4], causal=True, prefix_lens=[2]) == 11  # 2 + 2 + 3 + 4
    assert counts.attention_pairs([2], [5], causal=True, prefix_lens=[5]) == 10  # all 5 keys, twice
    # 2 heads of dim 8: 4 * 8 * 2 FLOPs per pair; the backward is 2.5 times the forward.
    assert counts.attention_flops([3], num_heads=2, head_dim=8, causal=True) == 384
    assert counts.attention_flops([3], num_heads=2, head_dim=8, causal=True, backward=True) == 960


def test_attention_pairs_match_an_explicit_mask():
    rng = random.Random()
    for _ in range(50):
        len_q, len_k = rng.randint(0, 12), rng.randint(0, 12)
        prefix = rng.randint(0, len_k)
        position = torch.arange(len_q)[:, None] + len_k - len_q
        j = torch.arange(len_k)[None, :]
        mask = (position >= 0) & ((j <= position) | (j < prefix))
        got = counts.attention_pairs([len_q], [len_k], causal=True, prefix_lens=[prefix])
        assert got == int(mask.sum()), (len_q, len_k, prefix)


def test_time_ms_is_the_median_and_rotates_inputs():
    seen = []
    ms = harness.time_ms(seen.append, ["a", "b", "c"], torch.device("cpu"), warmup=2, repeats=5)
    assert seen == ["a", "b", "a", "b", "c", "a", "b"]
    assert ms >= 0


def test_rows_and_fractions():
    row = compute_row("mm", "s", "float32", "cpp", ms=2.0, flops=4 * 10**9)
    assert row.tflops == pytest.approx(2.0)     # 4e9 FLOPs in 2 ms
    band = bandwidth_row("copy", "s", "float32", "cpp", 1.0, 3 * 10**6, None)
    assert band.gbps == pytest.approx(3.0)      # 3 MB in 1 ms
    fill_fractions([row, band], {"matmul_tflops": 4.0, "copy_gbps": 6.0})
    assert row.fraction_of_ceiling == pytest.approx(0.5)
    assert band.fraction_of_ceiling == pytest.approx(0.5)


def test_suspect_ceilings_flag_runs_far_from_known_figures():
    name = "NVIDIA H100 80GB HBM3"
    assert harness.suspect_ceilings(name, {"copy_gbps": 2900.0, "matmul_tflops": 760.0}) == []
    why = harness.suspect_ceilings(name, {"copy_gbps": 1500.0, "matmul_tflops": 760.0})
    assert len(why) == 1 and "copy_gbps" in why[0]
    assert harness.suspect_ceilings("some CPU", {"copy_gbps": 1.0}) == []


def test_measured_cpu_ceilings_are_positive():
    ceilings = harness.measure_ceilings(torch.device("cpu"), quick=True)
    assert ceilings["copy_gbps"] > 0 and ceilings["matmul_tflops"] > 0
    assert ceilings["suspect"] == []


def test_peer_status_gives_a_reason_for_every_skipped_peer():
    status = peer_status(torch.device("cpu"))
    assert set(status) == set(PEERS)
    assert status["torch.compile"] == "available"
    assert status["flash_attn"] != "available"  # GPU only, and not installed here
    assert all(isinstance(why, str) and why for why in status.values())


def _tiny_bench(device, quick, copy_gbps):
    rows = []
    for size in (64, 128):
        a = [torch.randn(size, size) for _ in range(2)]
        ms = harness.time_ms(lambda m: m @ m, a, device, warmup=1, repeats=3)
        rows.append(compute_row("matmul", f"n={size}", "float32", "cpp", ms,
                                counts.gemm_flops(size, size, size), size=size, note="tiny"))
        ms = harness.time_ms(lambda m: (m.double() @ m.double()), a, device, warmup=1, repeats=3)
        rows.append(compute_row("matmul", f"n={size}", "float32", "reference", ms,
                                counts.gemm_flops(size, size, size), size=size))
    return rows


def test_run_family_writes_results_plot_and_readme_tables(tmp_path, capsys):
    rows = harness.run_family("tiny", torch.device("cpu"), False, (_tiny_bench,), ("cpp",),
                              ("reference",), results_dir=str(tmp_path))
    assert all(r.fraction_of_ceiling is not None for r in rows)
    [path] = tmp_path.glob("tiny-*.json")
    results = json.loads(path.read_text())
    assert results["family"] == "tiny" and len(results["rows"]) == 4
    for key in ("device", "torch", "triton", "cuda", "commit", "date"):
        assert key in results["environment"]
    assert "cpp is" in capsys.readouterr().out
    tables = report.generate(str(tmp_path))
    assert "### tiny:" in tables and "| `matmul` | n=64 | float32 | `cpp` |" in tables
    assert "(CPU smoke numbers: the GPU kernels are not timed)" in tables  # a CPU run says so
    assert "note=tiny" in tables  # extra columns reach the notes
    assert "x reference" in tables  # the speed-up column of our backend
    section = report.replace_section(f"a\n{report.BEGIN}\nold\n{report.END}\nb\n", tables)
    assert section.startswith(f"a\n{report.BEGIN}\n### tiny")
    assert section.endswith(f"{report.END}\nb\n")


def test_plot_has_a_line_per_backend(tmp_path):
    pytest.importorskip("matplotlib")
    rows = _tiny_bench(torch.device("cpu"), True, None)
    path = plots.plot_family("tiny", rows, str(tmp_path / "tiny.png"), title="tiny")
    assert path.endswith("tiny.png") and (tmp_path / "tiny.png").stat().st_size > 1000


def test_docs_tables_are_generated_from_the_results_files():
    assert report.main(["--check"]) == 0
