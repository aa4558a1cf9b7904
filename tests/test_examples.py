"""The examples the main job runs, and the README's, keep working (they use only the public API)."""
import pathlib
import re
import runpy

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def test_packed_training_step_runs(capsys):
    runpy.run_path(str(EXAMPLES / "packed_training_step.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "tiles skipped from pixels: [False, False, True, True]" in out
    assert "on 12 answer tokens" in out and "[True, True, True]" in out


def test_readme_usage_examples_run():
    """The README's Python blocks, in order, as a reader would paste them; but the one that loads a
    transformers checkpoint (``from_pretrained(path, ...)``: tests/integrations run that path)."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
              if "from_pretrained(path" not in b]
    assert len(blocks) == 3
    exec(compile("\n".join(blocks), "README.md", "exec"), {})
