"""The examples the main job runs keep working (they use only the public API)."""
import pathlib
import runpy

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def test_packed_training_step_runs(capsys):
    runpy.run_path(str(EXAMPLES / "packed_training_step.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "tiles skipped from pixels: [False, False, True, True]" in out
    assert "on 12 answer tokens" in out and "[True, True, True]" in out
