"""The trainer end to end on the tiny preset (one decoder layer) and the demo data: exact resume,
world size changes, interrupted checkpoint writes, non-finite steps, accumulation, bad data, the
CLI.

Every op runs on its reference backend (``SPHINX_KERNELS_BACKEND=reference``), as in the other tests
of model logic rather than of kernels, in this process and in the ``torchrun`` ones.
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sphinx_model.train as train_module
from sphinx_model.data import DataConfig, SphinxData
from sphinx_model.export import export_checkpoint
from sphinx_model.export import main as export_main
from sphinx_model.parallel import Distributed
from sphinx_model.sphinx import SphinxX
from sphinx_model.train import TrainingDiverged, build_model, build_optimizer, train, train_step
from sphinx_model.train_checkpoint import latest_checkpoint, load_checkpoint
from sphinx_model.train_config import TrainConfig, model_config

ROOT = Path(__file__).resolve().parents[2]
ENV = Distributed()


@pytest.fixture(autouse=True)
def reference_kernels_one_thread(monkeypatch):
    """Reference backends, and one CPU thread: with several, the BLAS may pick its thread count from
    the machine's load (MKL's dynamic threading) and sum in another order, and bit-equality across
    runs is only defined for one summation order."""
    monkeypatch.setenv("SPHINX_KERNELS_BACKEND", "reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(output, **changes) -> TrainConfig:
    settings = dict(preset="tiny", model={"llm": {"num_layers": 1}}, data="demo", batch_size=4,
                    token_budget=1024, num_workers=0, steps=4, warmup_steps=2, lr=3e-3,
                    output=str(output), progress=False, cpu_threads=1)
    return TrainConfig(**{**settings, **changes})


def losses(output) -> list[float]:
    with open(Path(output) / "metrics.jsonl") as f:
        return [json.loads(line)["loss"] for line in f]


def run_cli(args, output_env=None, launcher=(sys.executable, "-m", "sphinx_model.train")):
    env = {**os.environ, "SPHINX_KERNELS_BACKEND": "reference", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # as a user runs it: Triton kernels are GPU-only
    return subprocess.run([*launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Losses of a 4-step single-process run: what every other run must reproduce."""
    out = tmp_path_factory.mktemp("uninterrupted")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPHINX_KERNELS_BACKEND", "reference")
        torch.set_num_threads(1)
        try:
            train(tiny(out), env=ENV)
        finally:
            torch.set_num_threads(threads)
    return losses(out)


def test_resume_reproduces_the_uninterrupted_losses_bit_for_bit(tmp_path, uninterrupted):
    train(tiny(tmp_path, steps=2, save_every=2), env=ENV)
    train(tiny(tmp_path), resume=True, env=ENV)
    assert losses(tmp_path) == uninterrupted
    assert uninterrupted[-1] < uninterrupted[0]


def test_two_gloo_ranks_match_one_and_their_checkpoint_resumes_on_one(tmp_path, uninterrupted):
    # fp32 tolerance: two ranks sum the gradients in another order, and Adam's normalised update
    # carries that rounding into the next step's loss (measured: up to 1.4e-6 relative).
    args = ["--preset", "tiny", "--model.llm.num_layers", "1", "--data", "demo",
            "--batch-size", "4", "--token-budget", "1024", "--num-workers", "0",
            "--warmup-steps", "2", "--lr", "3e-3", "--progress", "false", "--cpu-threads", "1",
            "--output", str(tmp_path)]
    # --standalone: a free rendezvous port, so runs of this test at the same time do not collide.
    done = run_cli(args + ["--steps", "2", "--save-every", "2"],
                   launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "2", "-m", "sphinx_model.train"))
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((tmp_path / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    torch.testing.assert_close(losses(tmp_path), uninterrupted[:2], rtol=1e-5, atol=0)
    # The 2 ranks' checkpoint exported in this one process is the model the 2 ranks exported.
    exported = export_checkpoint(tmp_path / "checkpoints" / "step-2", tmp_path / "exported")
    assert sorted(p.name for p in exported.iterdir()) == sorted(
        p.name for p in (tmp_path / "final").iterdir())
    final = SphinxX.from_pretrained(tmp_path / "final").checkpoint_state()
    assert_states_equal(SphinxX.from_pretrained(exported).checkpoint_state(), final)
    train(tiny(tmp_path), resume=True, env=ENV)  # 2 ranks' checkpoint, 1 rank now
    torch.testing.assert_close(losses(tmp_path), uninterrupted, rtol=1e-5, atol=0)


def assert_states_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, rtol=0, atol=0, msg=key)


def test_export_refuses_what_is_not_a_complete_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        export_checkpoint(tmp_path, tmp_path / "out")
    (tmp_path / "trainer_state.json").write_text('{"step": 1}')
    with pytest.raises(ValueError, match="no model configuration"):
        export_checkpoint(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_write_killed_midway_leaves_the_previous_checkpoint_for_resume(tmp_path, uninterrupted):
    # The process dies inside the step-4 write (after DCP wrote some shards, before the rename).
    script = (
        "import os, sys\n"
        "from torch.distributed.checkpoint import HuggingFaceStorageWriter\n"
        "import sphinx_model.train as t\n"
        "write = HuggingFaceStorageWriter.write_data\n"
        "def dying_write(self, plan, planner):\n"
        "    if 'step-4' in str(self.path):\n"
        "        write(self, plan, planner).wait()\n"
        "        os._exit(9)\n"
        "    return write(self, plan, planner)\n"
        "HuggingFaceStorageWriter.write_data = dying_write\n"
        "sys.exit(t.main(sys.argv[1:]))\n")
    args = ["--preset", "tiny", "--model.llm.num_layers", "1", "--batch-size", "4",
            "--token-budget", "1024", "--num-workers", "0", "--warmup-steps", "2", "--lr", "3e-3",
            "--progress", "false", "--cpu-threads", "1", "--output", str(tmp_path), "--steps", "4",
            "--save-every", "2"]
    done = run_cli(args, launcher=(sys.executable, "-c", script))
    assert done.returncode == 9, done.stderr[-3000:]
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / ".tmp-step-4").is_dir() and not (checkpoints / "step-4").exists()
    assert latest_checkpoint(checkpoints).name == "step-2"
    done = run_cli(args + ["--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout and "step-2" in done.stdout
    assert losses(tmp_path) == uninterrupted
    assert latest_checkpoint(checkpoints).name == "step-4"


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    step_of_call = iter(range(100))
    poisoned = {1}

    def poisoning_step(model, batch, optimizer, cfg, env):
        (loss, lm_loss), trained = train_step(model, batch, optimizer, cfg, env)
        if next(step_of_call) in poisoned:
            loss = loss * float("nan")
        return (loss, lm_loss), trained

    monkeypatch.setattr(train_module, "train_step", poisoning_step)
    result = train(tiny(tmp_path, steps=3, save_every=1), env=ENV)
    assert result.skipped["nonfinite_step"] == 1
    assert [r["skipped"]["nonfinite_step"] for r in result.metrics] == [0, 1, 1]
    # From now on every step is poisoned: two in a row stop the run, the last checkpoint intact.
    poisoned.update(range(3, 100))
    with pytest.raises(TrainingDiverged, match="2 steps in a row had a non-finite loss"):
        train(tiny(tmp_path, steps=6, save_every=1, max_bad_steps=2), resume=True, env=ENV)
    last = latest_checkpoint(tmp_path / "checkpoints")
    assert last.name == "step-4"  # step 4 was skipped (no update), its checkpoint is still good
    cfg = tiny(tmp_path)
    model = build_model(cfg, model_config(cfg), ENV)
    optimizer, _ = build_optimizer(cfg, model)
    load_checkpoint(last, model, optimizer, ENV)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_four_micro_batches_give_the_gradient_of_one_batch(tmp_path):
    # The language-model loss splits exactly over micro-batches (each is normalised by the step's
    # trained tokens); the routers' losses are statistics of each micro-batch's own tokens (as in
    # Mixtral and Megatron), which no split preserves: they are off here.
    cfg = tiny(tmp_path, batch_size=8, moe_aux_loss_weight=0.0, moe_z_loss_weight=0.0)
    model_cfg = model_config(cfg)
    model = build_model(cfg, model_cfg, ENV)
    grads = []
    for budget in (320, 4096):
        data = SphinxData.from_config(DataConfig(path="demo", budget=budget, global_batch=8,
                                                 num_workers=0), model_cfg)
        batch = data.step_batch(0)
        assert (len(batch.micro_batches) >= 4) == (budget == 320)
        train_step(model, batch, None, dataclasses.replace(cfg, token_budget=budget), ENV)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_bad_data_is_skipped_counted_and_reported(tmp_path, capsys):
    from sphinx_model.demo import build_demo

    demo = build_demo()
    photo = next(demo.directory.rglob("*.jpg"))
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    good = {"image": str(photo), "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A photo."}]}
    lines = [json.dumps(good), json.dumps({**good, "image": "missing.jpg"}),
             json.dumps({**good, "image": str(tmp_path / "corrupt.jpg")}), "{not json",
             json.dumps({"conversations": [{"from": "human", "value": "Hi"},
                                           {"from": "gpt", "value": "Hello."}]})]
    dataset = tmp_path / "data.jsonl"
    dataset.write_text("\n".join(lines) + "\n")
    result = train(tiny(tmp_path / "run", data=str(dataset), tokenizer=str(demo.tokenizer),
                        batch_size=5, steps=2), env=ENV)
    counts = {cause: n for cause, n in result.skipped.items() if n}
    assert counts.get("missing_image") and counts.get("corrupt_image") and counts.get(
        "malformed_json"), counts
    assert result.metrics[-1]["skipped"] == result.skipped
    assert "missing_image" in capsys.readouterr().out


def test_help_and_unknown_keys(capsys):
    done = run_cli(["--help"])
    assert done.returncode == 0 and "--save-every" in done.stdout and "--lr" in done.stdout
    with pytest.raises(SystemExit) as exit_info:
        train_module.parse_args(["--steps", "2", "--lrr", "1"])
    assert exit_info.value.code == 2 and "unknown config key 'lrr'" in capsys.readouterr().err


def test_export_cli_names_a_bad_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(tmp_path), str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "not a complete checkpoint" in capsys.readouterr().err
