"""Every Triton kernel launchable on H100 (sm_90) and A100 (sm_80), checked without a GPU: the check
of ``sphinx_kernels.aot`` (record every launch at SPHINX-X sizes, compile each specialisation for
both targets, judge shared memory, spills, tensor cores), run once in a subprocess with Triton's
compiler (this process runs Triton's interpreter), plus fast tests of its parsers and rules.

A violation fails its kernel's test unless ``sphinx_kernels.aot.policy.EXEMPTIONS`` (the one list of
justified exceptions, each with its measured reason) covers it; an exemption that covers nothing
fails too (take it off the list).
"""
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from sphinx_kernels.aot import cuda_sources, policy, report
from sphinx_kernels.aot.compile import Measurement, classify_dots, parse_ptxas_log
from sphinx_kernels.aot.record import TARGETS, Launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every Triton kernel of the project that the public ops launch (device helpers excluded), as
# ``<op>.<kernel>`` (its module in sphinx_kernels/triton/ and its function).
KERNELS = (
    "apply_rotary._rotary_kernel",
    *(f"varlen_attention._attn_{k}_kernel" for k in ("fwd", "bwd_delta", "bwd_dkdv", "bwd_dq")),
    "gather_rows._gather_rows_kernel", "gather_rows._segment_sum_rows_kernel",
    "find_padding_tiles._find_padding_tiles_kernel",
    *(f"patch_projection._{k}_kernel" for k in ("patch_projection", "layer_norm",
                                                "layer_norm_backward", "grad_features",
                                                "grad_weight")),
    "topk_gating._topk_gating_kernel", "topk_gating._topk_gating_backward_kernel",
    "moe_routing._block_histogram_kernel", "moe_routing._scatter_positions_kernel",
    "moe_permute._permute_rows_kernel",
    "moe_unpermute._unpermute_rows_kernel", "moe_unpermute._pair_dots_kernel",
    *(f"moe_expert_mlp._{k}_kernel" for k in ("gate_up", "down_proj", "swiglu_backward",
                                              "input_grad", "weight_grad_pair", "weight_grad")),
)

@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """The check's results (``--check``: the document is compared, not written)."""
    path = tmp_path_factory.mktemp("launchability") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "sphinx_kernels.aot", "--check", "--json",
                           str(path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800, check=False)
    assert path.exists(), f"the check did not finish:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    data = json.loads(path.read_text())
    data["returncode"] = done.returncode
    return data


@pytest.mark.parametrize("target", [t.name for t in TARGETS])
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_launches_on_target(results, kernel, target):
    rows = [r for r in results["rows"] if r["kernel"] == kernel and r["target"] == target]
    assert rows, f"no launch of {kernel} was recorded for {target}"
    found = [f"{'/'.join(row['dtypes'])} {v['rule']}: {v['detail']} [{row['config']}]"
             for row in rows for v in row["violations"] if not v["exempt"]]
    assert not found, "violations:\n" + "\n".join(found)


def test_every_exemption_covers_a_violation(results):
    used = {(row["kernel"], row["target"], v["rule"]) for row in results["rows"]
            for v in row["violations"] if v["exempt"]}
    stale = [e for e in policy.EXEMPTIONS
             if not any(k == e.kernel and r == e.rule and (e.target is None or t == e.target)
                        for k, t, r in used)]
    assert not stale, f"exemptions that cover nothing, take them off policy.EXEMPTIONS: {stale}"


def test_every_launched_kernel_is_listed(results):
    assert {r["kernel"] for r in results["rows"]} == set(KERNELS)


def test_every_jit_function_is_launched_or_called_by_a_kernel():
    """A Triton function that no workload launches must be a device helper (called from another
    jit function's source); else it is a kernel the check does not cover."""
    import importlib
    import inspect
    import pkgutil

    import sphinx_kernels.triton as package
    functions = {}
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (hasattr(value, "fn") and type(value).__module__.startswith("triton")
                    and value.fn.__module__ == info.name):  # defined there, not imported
                functions[f"{info.name.rsplit('.', 1)[-1]}.{name}"] = inspect.getsource(value.fn)
    assert set(KERNELS) <= set(functions)
    helpers = set(functions) - set(KERNELS)
    sources = "\n".join(functions.values())
    uncalled = [h for h in helpers if not re.search(rf"\b{h.split('.')[-1]}\(", sources)]
    assert not uncalled, f"jit functions neither launched by a workload nor called: {uncalled}"


def test_cuda_sources_compile_for_both_targets_and_do_not_spill(results):
    if not results["cuda"] and not results["cuda_errors"]:
        pytest.skip("nvcc is not installed")
    assert not results["cuda_errors"]
    for source in cuda_sources.sources(ROOT):
        measured = {k["target"] for k in results["cuda"] if k["source"] == source}
        assert measured == set(cuda_sources.ARCHS), source
    spilling = [k for k in results["cuda"] if k["spill_stores"] or k["spill_loads"]]
    assert not spilling


def test_document_is_generated_from_this_toolchain(results):
    with open(report.DOC) as f:
        text = f.read()
    env = results["environment"]
    if f"triton {env['triton']}, ptxas {env['ptxas']};" not in text:
        pytest.skip(f"docs/launchability.md is from another toolchain than triton {env['triton']}")
    assert not results["returncode"] & 2, "stale: run python -m sphinx_kernels.aot"


def _probe(x_ptr, y_ptr, n, one, stride, BLOCK):  # a kernel signature for the test below
    pass


def test_recorded_launch_is_specialised_as_tritons_launcher_does():
    """The recorder's tensor stand-ins give the attributes Triton's own binder gives real tensors:
    16-byte aligned pointers and integers divisible by 16 marked, integers equal to 1 constant."""
    import torch
    from triton import knobs
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from sphinx_kernels.aot import record
    kernel = JITFunction(_probe)
    kernel.params[-1].is_constexpr = True  # BLOCK, as if annotated tl.constexpr
    x = torch.empty(64, dtype=torch.float16)
    args, meta = (x, x[1:], 32, 1, 7), {"BLOCK": 16, "num_warps": 4}
    recorder = record._Recorder(TARGETS[0])
    recorder.workload = SimpleNamespace(name="probe", dtype="float16")
    recorder.run(kernel, *args, grid=(3,), warmup=False, **meta)
    [launch] = recorder.launches
    options = {"debug": False, "instrumentation_mode": knobs.compilation.instrumentation_mode}
    binder = create_function_from_signature(kernel.signature, kernel.params, recorder.backend)
    bound, specialization, opts = binder(*args, **meta, **options)
    _, signature, constexprs, attrs = kernel._pack_args(recorder.backend, {**meta, **options},
                                                        bound, specialization, opts)
    assert (launch.signature, launch.constexprs, launch.attrs) == (signature, constexprs, attrs)
    divisible = [["tt.divisibility", 16]]
    assert [launch.attrs.get((i,)) for i in (0, 1, 2, 4)] == [divisible, [], divisible, []]
    assert launch.constexprs == {(3,): 1, (5,): 16} and launch.options["num_warps"] == 4
    assert launch.grid == (3,)


# --------------------------------------------------------------------------------------------------
# The parsers and rules, on canned compiler output.

_PTXAS_LOG = """ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_attn_bwd_dkdv_kernel' for 'sm_90a'
ptxas info    : Function properties for _attn_bwd_dkdv_kernel
    56 bytes stack frame, 56 bytes spill stores, 52 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 56 bytes cumulative stack size
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized
ptxas info    : Compile time = 130.739 ms
"""


def test_ptxas_log_gives_registers_spills_and_notes():
    parsed = parse_ptxas_log(_PTXAS_LOG)
    assert [parsed[k] for k in ("registers", "spill_stores", "spill_loads", "stack")] == [
        255, 56, 52, 56]
    assert len(parsed["warnings"]) == 1 and "serialized" in parsed["warnings"][0]


_TTGIR = """#blocked = #ttg.blocked<{sizePerThread = [1, 4], threadsPerWarp = [8, 4]}>
#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [1, 8]}>
%a = ttng.warp_group_dot %q, %k, %c {isAsync = true} : !ttg.memdesc<64x128xbf16, #shared> * \
!ttg.memdesc<128x64xbf16, #shared1> -> tensor<64x64xf32, #mma>
%w = ttng.warp_group_dot_wait %a {pendings = 0 : i32} : tensor<64x64xf32, #mma>
%b = tt.dot %x, %y, %c, inputPrecision = tf32 : tensor<64x64xf16, #ttg.dot_op<{opIdx = 0}>> * \
tensor<64x64xf16, #ttg.dot_op<{opIdx = 1}>> -> tensor<64x64xf32, #mma1>
%c = tt.dot %x, %y, %c, inputPrecision = tf32 : tensor<16x16xbf16, #ttg.dot_op<{opIdx = 0}>> * \
tensor<16x16xbf16, #ttg.dot_op<{opIdx = 1}>> -> tensor<16x16xf32, #blocked>
%d = tt.dot %x, %y, %c, inputPrecision = ieee : tensor<64x64xf32, #ttg.dot_op<{opIdx = 0}>> * \
tensor<64x64xf32, #ttg.dot_op<{opIdx = 1}>> -> tensor<64x64xf32, #blocked>
"""


def test_dots_are_classified_by_their_lowering():
    # wgmma, mma.sync and no tensor cores once each; the float32 dot is not counted
    assert classify_dots(_TTGIR) == {"wgmma": 1, "mma": 1, "fma": 1}


def _launch(dtypes, grid=(1, 1, 1)) -> Launch:
    return Launch("sphinx_kernels.triton.op", "_k", {"x": "*bf16", "B": "constexpr"}, {(1,): 64},
                  {}, {"num_warps": 4, "num_stages": 3}, grid, ["case"], list(dtypes))


def test_rules_judge_shared_memory_spills_tensor_cores_and_grid():
    sm90, sm80 = TARGETS
    fine = Measurement("sm_90", shared=sm90.shared_per_block, registers=128, dots={"wgmma": 2})
    assert policy.violations(_launch(["bfloat16"]), fine, sm90) == []
    over = Measurement("sm_80", shared=sm80.shared_per_block + 1)
    assert [v.rule for v in policy.violations(_launch(["float32"]), over, sm80)] == ["shared"]
    spilling = Measurement("sm_90", registers=255, spill_stores=8, spill_loads=8)
    assert [v.rule for v in policy.violations(_launch(["float16"]), spilling, sm90)] == ["spills"]
    assert policy.violations(_launch(["float32"]), spilling, sm90) == []  # float32 may spill
    mma_on_hopper = Measurement("sm_90", dots={"wgmma": 1, "mma": 1})
    assert [v.rule for v in policy.violations(_launch(["bfloat16"]), mma_on_hopper, sm90)] == [
        "tensor cores"]
    assert policy.violations(_launch(["bfloat16"]), Measurement("sm_80", dots={"mma": 3}),
                             sm80) == []
    broken = Measurement("sm_80", error="CompilationError: ...")
    assert [v.rule for v in policy.violations(_launch(["bfloat16"]), broken, sm80)] == ["compile"]
    too_wide = _launch(["float32"], grid=(4, 70000, 1))
    assert [v.rule for v in policy.violations(too_wide, fine, sm90)] == ["grid"]


def test_an_exemption_covers_its_kernel_rule_dtype_target_and_constants_only(monkeypatch):
    sm90, sm80 = TARGETS
    exemption = policy.Exemption("op._k", "spills", "a reason", dtype="float16", target="sm_90",
                                 where=(("B", 64),))
    monkeypatch.setattr(policy, "EXEMPTIONS", (exemption,))
    spilling = Measurement("sm_90", registers=255, spill_stores=8)
    [excused] = policy.violations(_launch(["float16"]), spilling, sm90)
    assert excused.excused_by is exemption
    [other_dtype] = policy.violations(_launch(["bfloat16"]), spilling, sm90)
    [other_target] = policy.violations(_launch(["float16"]), spilling, sm80)
    other_block = _launch(["float16"])
    other_block.constexprs = {(1,): 128}
    [other_constant] = policy.violations(other_block, spilling, sm90)
    assert all(v.excused_by is None for v in (other_dtype, other_target, other_constant))


_SCATTER, _OFFSETS = ("_ZN14sphinx_kernels12_GLOBAL__N_122routing_scatter_kernelIiEEvPKT_",
                      "_ZN14sphinx_kernels12_GLOBAL__N_122routing_offsets_kernelEPi")
_NVCC_LOG = f"""ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '{_SCATTER}' for 'sm_90'
ptxas info    : Function properties for {_SCATTER}
    0 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 1024 bytes smem
ptxas info    : Compiling entry function '{_OFFSETS}' for 'sm_90'
ptxas info    : Function properties for {_OFFSETS}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 34 registers, used 1 barriers
"""


def test_nvcc_log_gives_each_kernel_demangled():
    kernels = cuda_sources.parse_log(_NVCC_LOG, "csrc/moe/moe.cu")
    assert [(k.target, k.registers, k.spill_stores, k.spill_loads, k.shared) for k in kernels] == [
        ("sm_90", 32, 4, 8, 1024), ("sm_90", 34, 0, 0, 0)]
    if cuda_sources.shutil.which("c++filt"):
        assert [k.name for k in kernels] == ["routing_scatter_kernel<int>",
                                             "routing_offsets_kernel"]


def _compile_or_die(launch, target):
    """Stands in for ``compile_launch`` in a worker: the process dies on a launch of grid (2,)."""
    if launch.grid == (2,):
        os.abort()
    return Measurement(target.name, registers=launch.grid[0])


def test_a_compile_that_kills_its_worker_is_a_compile_error_of_that_launch_alone(tmp_path):
    from sphinx_kernels.aot.check import in_turn
    jobs = [(_launch(["bfloat16"], grid=(g,)), TARGETS[0]) for g in (1, 2, 3)]
    for (launch, _), g in zip(jobs, (1, 2, 3)):
        launch.constexprs = {(1,): g}  # distinct keys
    results = in_turn(_compile_or_die, jobs, str(tmp_path))
    first, dead, last = (results[launch.key, target.name] for launch, target in jobs)
    assert (first.registers, last.registers) == (1, 3) and first.error is last.error is None
    assert "died" in dead.error
    [violation] = policy.violations(jobs[1][0], dead, TARGETS[0])
    assert violation.rule == "compile"


def test_generated_section_replaces_only_the_marked_part():
    text = f"intro\n{report.BEGIN}\nold\n{report.END}\nend\n"
    expected = f"intro\n{report.BEGIN}\nnew\n{report.END}\nend\n"
    assert report.replace_section(text, "new\n") == expected
