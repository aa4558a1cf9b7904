"""TrainConfig: YAML, command-line overrides, model overrides, and errors that name the key."""
import pytest
import yaml

from sphinx_model import preset
from sphinx_model.train_config import TrainConfig, load_train_config, model_config


def test_defaults_build_the_preset():
    cfg = load_train_config()
    assert cfg == TrainConfig() and model_config(cfg) == preset("tiny")


def test_command_line_overrides_the_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"lr": 0.5, "steps": 7, "model": {"llm": {"num_layers": 3}},
                                    "output": "a"}))
    cfg = load_train_config(str(path), [("steps", "9"), ("save-every", "3"), ("lr", "1e-3"),
                                        ("model.llm.top_k", "1"), ("output", "123"),
                                        ("adam_betas", "[0.8, 0.9]"), ("init", "null"),
                                        ("compile", "true")])
    assert (cfg.steps, cfg.save_every, cfg.lr, cfg.output) == (9, 3, 1e-3, "123")
    assert cfg.adam_betas == [0.8, 0.9] and cfg.init is None and cfg.compile is True
    llm = model_config(cfg).llm
    assert (llm.num_layers, llm.top_k) == (3, 1)


@pytest.mark.parametrize("overrides,error,message", [
    ([("lrr", "1")], ValueError, "unknown config key 'lrr' in the command line"),
    ([("model.llm.num_layer", "2")], ValueError, "unknown config key model.llm.num_layer"),
    ([("model.vison.grid", "2")], ValueError, "unknown config key model.vison"),
    ([("steps", "x")], TypeError, "config key steps must be"),
    ([("steps", "0")], ValueError, "steps must be >= 1"),
    ([("dtype", "fp8")], ValueError, "dtype must be auto, bfloat16 or float32"),
    ([("preset", "huge")], ValueError, "unknown preset 'huge'"),
    ([("model.llm.num_heads", "3")], ValueError, "llm.num_heads (3) must be a multiple"),
])
def test_bad_settings_are_rejected_by_name(overrides, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_train_config(None, overrides)


def test_an_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stepz: 3\n")
    with pytest.raises(ValueError, match="unknown config key 'stepz' in .*run.yaml"):
        load_train_config(str(path))
