"""`train.init_from`: a finetune is an ordinary training run that starts from another run's weights.

One process, ZeRO-2 fp32, a small regression model on synthetic batches: run A trains with an EMA;
run B (`train.init_from=A`) must start from exactly the weights evaluation loads from A (its EMA),
and its resume must not load them again. A run dir made before the field (launch.entry=
megavla.eval.finetune:run + init_from.json) must start from the same weights; the experiment driver
moves such a file into the config so the sweep resumes the run instead of refusing a changed config.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from megavla.config import ConfigError, load_config, to_dict, write_yaml
from megavla.config.model import ModelConfig
from megavla.model.synthetic import random_batch

MODEL = ModelConfig(preset="tiny", action_dim=8, state_dim=8)


class Regressor(nn.Module):
    """actions ~ f(state): a loss that falls, weights that move."""

    def __init__(self, cfg=None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))

    def forward(self, batch) -> dict:
        pred = self.net(batch.state.float())
        loss = ((pred - batch.actions[:, 0].float()) ** 2).mean()
        return {"loss": loss}


def loader_factory(cfg, rank, world_size, seed=None, split="train"):
    return [random_batch(MODEL, num_cameras=1, seed=i) for i in range(4)]   # a finite loader: epochs


def config(run_dir: Path, **train):
    overrides = [f"train.run_dir={run_dir}", "train.steps=4", "train.zero_stage=2", "train.precision=fp32",
                 "train.lr=0.05", "train.warmup_steps=0", "train.save_every=2", "train.log_every=1",
                 "train.tensorboard=false", "train.progress=false", "data.augment_images=false",
                 *[f"train.{k}={v}" for k, v in train.items()]]
    return load_config(None, overrides)


@pytest.fixture()
def snapshots(monkeypatch):
    """The model's weights right after each warm-start load (what the run starts from)."""
    from megavla.train import warm_start
    taken, real = [], warm_start.load_init_weights

    def load_and_snapshot(model, init_from):
        real(model, init_from)
        taken.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    monkeypatch.setattr(warm_start, "load_init_weights", load_and_snapshot)
    return taken


def train(cfg, resume=None) -> int:
    from megavla.train.entry import run
    return run(cfg, resume, model_factory=Regressor, loader_factory=loader_factory)


@pytest.fixture()
def pretrained(tmp_path) -> Path:
    assert train(config(tmp_path / "a", ema_decay=0.5)) == 0
    return tmp_path / "a"


def test_init_from_starts_from_the_evaluated_weights_and_a_resume_keeps_its_own(tmp_path, pretrained, snapshots):
    from megavla.eval.policy import load_state_dict
    ckpt = pretrained / "checkpoints" / "step_000004"
    expected = load_state_dict(ckpt)                 # what evaluation loads: A's EMA
    raw = load_state_dict(ckpt, "raw")
    assert not torch.equal(expected["net.0.weight"], raw["net.0.weight"])
    cfg = config(tmp_path / "b", steps=2, max_steps_per_run=1)
    cfg.train.init_from = str(pretrained)
    assert train(cfg) == 0
    assert len(snapshots) == 1
    assert all(torch.equal(snapshots[0][k], expected[k]) for k in expected)
    # the resume restores B's own step-1 checkpoint: no second warm-start load
    assert train(cfg, "auto") == 0
    assert len(snapshots) == 1
    saved = json.loads((tmp_path / "b" / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert saved["step"] == 2 and saved["config"]["train"]["init_from"] == str(pretrained)


def test_legacy_init_from_json_run_dir_starts_the_same(tmp_path, pretrained, snapshots, monkeypatch):
    from megavla.eval import finetune
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    (run_dir / "init_from.json").write_text(json.dumps({"checkpoint": str(pretrained)}))
    cfg = config(run_dir, steps=1)
    cfg.launch.entry = "megavla.eval.finetune:run"
    write_yaml(cfg, run_dir / "config.yaml")
    # the experiment driver's conversion: the sweep now sees the config it would write today
    finetune.adopt_legacy_init(run_dir, steps=1)
    converted, today = load_config(run_dir / "config.yaml"), config(run_dir, steps=1, init_from=str(pretrained))
    assert converted.train.init_from == str(pretrained)
    # what launch.sweep compares before resuming a run (launch settings may differ between attempts)
    assert {k: v for k, v in to_dict(converted).items() if k != "launch"} == \
        {k: v for k, v in to_dict(today).items() if k != "launch"}
    # the old entry still works on an unconverted config (a job queued before the change)
    from megavla.train import entry
    seen, real_run = [], entry.run
    monkeypatch.setattr(entry, "run", lambda c, r=None: seen.append(c.train.init_from) or real_run(
        c, r, overwrite=True, model_factory=Regressor, loader_factory=loader_factory))
    assert finetune.run(config(run_dir, steps=1)) == 0
    assert seen == [str(pretrained)]
    from megavla.eval.policy import load_state_dict
    expected = load_state_dict(pretrained / "checkpoints" / "step_000004")
    assert all(torch.equal(snapshots[-1][k], expected[k]) for k in expected)
    # null: random initial weights, no load
    (run_dir / "init_from.json").write_text(json.dumps({"checkpoint": None}))
    assert finetune.with_legacy_init(config(run_dir)).train.init_from == ""
    (run_dir / "init_from.json").write_text(json.dumps({"checkpoint": "/elsewhere"}))
    with pytest.raises(ConfigError, match="init_from.json names '/elsewhere'"):
        finetune.with_legacy_init(config(run_dir, init_from=str(pretrained)))


def test_bad_init_from_is_a_config_error_naming_the_field(tmp_path):
    """Checked at launch (preflight), not at load: a finetuned checkpoint's saved config names its
    init_from, and evaluation / export must still load it after the pretraining run moved."""
    from megavla.train.preflight import check_paths
    moved = load_config(None, [f"train.init_from={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match=r"train.init_from='.*missing': no such directory; give a MegaVLA run dir"):
        check_paths(moved)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds none of .*checkpoints.*it is not a MegaVLA run dir"):
        check_paths(load_config(None, [f"train.init_from={tmp_path / 'empty'}"]))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert load_config(None, [f"train.init_from={tmp_path / 'run'}"]).train.init_from == str(tmp_path / "run")
    check_paths(load_config(None, [f"train.init_from={tmp_path / 'run'}"]))
    with pytest.raises(ConfigError, match="both set the initial weights; keep one"):
        load_config(None, [f"train.init_from={tmp_path / 'run'}", f"train.pretrained={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="set train.zero3_init=false"):
        load_config(None, [f"train.init_from={tmp_path / 'run'}", "train.zero_stage=3"])
