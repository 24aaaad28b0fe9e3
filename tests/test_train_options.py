"""Trainer options in one in-process run (world size 1, toy model): frozen parameters stay put,
EMA weights are saved and differ from the raw ones, gradient accumulation, ZeRO-1, keep_last,
`--resume` of a finished run is a no-op, metrics keys."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from megavla.config import load_config
from megavla.train import checkpoint as ckpt
from megavla.train.entry import run
from megavla.train.export import consolidated_state_dict

from helpers.toy_training import ToyVLA, toy_loader_factory, toy_model_factory


def test_freeze_ema_accumulation_zero1(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)   # run() sets them for a 1-process group; undone after
    run_dir = tmp_path / "run"
    cfg = load_config(None, [f"train.run_dir={run_dir}", "train.steps=6", "train.zero_stage=1",
                             "train.precision=fp32", "train.lr=0.01", "train.warmup_steps=1",
                             "train.grad_accum=2", "train.freeze=[norm]", "train.ema_decay=0.5",
                             "train.save_every=3", "train.keep_last=1", "train.log_every=2",
                             "train.progress=false", "data.batch_size=4"])
    assert run(cfg, model_factory=toy_model_factory, loader_factory=toy_loader_factory) == 0
    done = ckpt.list_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in done] == ["step_000006"]                 # keep_last=1 pruned step 3
    weights = consolidated_state_dict(done[0])
    torch.manual_seed(cfg.train.seed)
    init = ToyVLA().state_dict()
    assert torch.equal(weights["norm.weight"], init["norm.weight"])  # frozen
    assert not torch.equal(weights["net.0.weight"], init["net.0.weight"])
    ema = load_file(str(done[0] / "ema.safetensors"))
    assert "norm.weight" not in ema                                  # EMA of trainable params only
    assert not torch.equal(ema["net.0.weight"], weights["net.0.weight"])
    assert (ema["net.0.weight"] - weights["net.0.weight"]).abs().max() < \
        (init["net.0.weight"] - weights["net.0.weight"]).abs().max()  # EMA lies between init and now
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    # grad_accum=2 x micro 4 x world 1: 8 samples per optimizer step (the logged values are means
    # over the 2 steps since the last log, so their product is only close to 8; 4 or 16 would fail).
    assert records[-1]["perf/samples_per_s"] * records[-1]["time/step_s"] == pytest.approx(8, rel=0.2)
    assert {"loss/total", "loss/flow", "flow/emb0", "optim/lr", "optim/grad_norm", "time/data_wait_pct",
            "time/fwd_bwd_s", "time/optimizer_s", "perf/tokens_per_s", "memory/peak_mb",
            "data/skipped_bad_sample"} <= set(records[-1])
    state = ckpt.read_trainer_state(done[0])
    assert state["step"] == 6 and state["world_size"] == 1 and state["config"]["train"]["grad_accum"] == 2

    # Resuming a finished run trains nothing (builds no model or engine) and keeps the checkpoint.
    def no_model(cfg):
        raise AssertionError("a resume with nothing to train built the model")
    assert run(cfg, resume="auto", model_factory=no_model, loader_factory=toy_loader_factory) == 0
    assert [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")] == ["step_000006"]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    # ... and `megavla train --nproc 2 --resume auto` starts no worker process for it at all.
    from megavla.train import cli as train_cli

    def no_launch(*args, **kwargs):
        raise AssertionError("worker processes started for a run with nothing to train")
    monkeypatch.setattr(train_cli, "launch_local", no_launch)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):   # run() set them; the launcher runs outside a job
        monkeypatch.delenv(var, raising=False)
    assert train_cli.main([str(run_dir / "config.yaml"), "--nproc", "2", "--resume", "auto"]) == 0


def test_zero3_checkpoint_resumes_exactly_and_exports(tmp_path, monkeypatch):
    """ZeRO-3 (partitioned parameters), 1 rank in-process: 4 straight == 2 + resume + 2, and the
    consolidated export has every parameter at its full shape."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)

    def cfg(name, *extra):
        return load_config(None, [f"train.run_dir={tmp_path / name}", "train.steps=4", "train.zero_stage=3",
                                  "train.precision=fp32", "train.lr=0.01", "train.warmup_steps=1",
                                  "train.log_every=1", "train.progress=false", "train.tensorboard=false",
                                  "data.batch_size=4", *extra])

    def losses(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss/total"] for r in map(json.loads, lines)}

    kw = dict(model_factory=toy_model_factory, loader_factory=toy_loader_factory)
    assert run(cfg("straight"), **kw) == 0
    assert run(cfg("split", "train.max_steps_per_run=2"), **kw) == 0
    assert run(cfg("split"), resume="auto", **kw) == 0
    straight, split = losses("straight"), losses("split")
    assert sorted(split) == [1, 2, 3, 4]
    for step in (3, 4):
        assert split[step] == pytest.approx(straight[step], rel=1e-6), step
    weights = consolidated_state_dict(tmp_path / "split" / "checkpoints" / "step_000004")
    shapes = {n: tuple(p.shape) for n, p in ToyVLA().named_parameters()}
    assert {n: tuple(t.shape) for n, t in weights.items()} == shapes


def test_worker_main_accepts_what_the_launcher_passes(tmp_path, monkeypatch):
    """The local launcher starts `python -m megavla.train.entry CONFIG [--resume X] [--overwrite]`."""
    from megavla.train import entry
    seen = []
    monkeypatch.setattr(entry, "run", lambda cfg, **kw: seen.append(kw) or 0)
    monkeypatch.setattr(entry, "shutdown_distributed", lambda wait_for_peers=True: None)
    config = tmp_path / "config.yaml"
    config.write_text("train:\n  steps: 1\n")
    for extra, want in (([], dict(resume=None, overwrite=False)),
                        (["--resume", "auto", "--overwrite"], dict(resume="auto", overwrite=True))):
        monkeypatch.setattr("sys.argv", ["megavla.train.entry", str(config), *extra])
        assert entry.worker_main() == 0
        assert seen[-1] == want
