"""Training checkpoints: round trip of model, optimizer and RNG; keep-last; incomplete writes are
never picked up; no pickle in the files."""
import json
import random

import torch

from sphinx_model.parallel import Distributed
from sphinx_model.train_checkpoint import (TRAINER_STATE, checkpoint_dirs, latest_checkpoint,
                                           load_checkpoint, save_checkpoint)

ENV = Distributed()


def trained_pair(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(4, 5)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_round_trip_restores_model_optimizer_rng_and_state(tmp_path):
    model, optimizer = trained_pair(0)
    random.seed(3)
    save_checkpoint(tmp_path, 4, model, optimizer, {"data_step": 4}, ENV, keep_last=3)
    expected = (torch.rand(3), random.random())
    fresh, fresh_optimizer = trained_pair(1)
    state = load_checkpoint(tmp_path / "step-4", fresh, fresh_optimizer, ENV)
    assert state["step"] == 4 and state["data_step"] == 4 and state["world_size"] == 1
    # The RNGs continue where they were when saved.
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), fresh.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][key], fresh_optimizer.state[q][key])
    # Both go on identically.
    x = torch.randn(4, 5)
    for m, o in ((model, optimizer), (fresh, fresh_optimizer)):
        m(x).square().sum().backward()
        o.step()
    assert torch.equal(model[0].weight, fresh[0].weight)


def test_keep_last_and_incomplete_writes(tmp_path):
    model, optimizer = trained_pair(0)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, optimizer, {}, ENV, keep_last=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-2", "step-3"]
    # A write cut off before its rename, and a renamed directory without the trainer state, are
    # not checkpoints.
    (tmp_path / ".tmp-step-4").mkdir()
    (tmp_path / "step-5").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-3"
    # The checkpoint is safetensors and JSON only: no pickle anywhere.
    files = sorted(p.name for p in (tmp_path / "step-3").iterdir())
    assert all(f.endswith(".safetensors") for f in files if f != TRAINER_STATE), files
    json.loads((tmp_path / "step-3" / TRAINER_STATE).read_text())
