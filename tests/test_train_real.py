"""The trainer with the real pieces: the streaming loader (resume bit-exactness on 2 ranks, through
the trainer's own loader factory and JSON state round trip) and the tiny VLA on 2 processes with
ZeRO-2, then `megavla export` -> model.safetensors that loads back into the model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from megavla.config import load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from megavla.data.cli import main as data_main
    out = tmp_path_factory.mktemp("shards")
    assert data_main(["synth", "--out", str(out), "--scenes", "1", "--tasks", "2", "--episodes-per-combo", "2",
                      "--image-size", "32", "--embodiments", "robot/arm,human/ego", "--shard-size-mb", "1",
                      "--workers", "1", "--no-progress"]) == 0
    return out


def demo_cfg(shards: Path, tmp: Path, *extra: str):
    return load_config(CONFIG, [f"data.sources.robot={shards / 'robot'}", f"data.sources.human={shards / 'human'}",
                                f"train.run_dir={tmp / 'run'}", "data.batch_size=2", "data.num_workers=0",
                                *extra])


def test_loader_resume_40_then_8_bit_equal_on_2_ranks(shards, tmp_path):
    from megavla.train.entry import default_loader_factory
    cfg = demo_cfg(shards, tmp_path)
    for rank in range(2):
        reader = iter(loader := default_loader_factory(cfg, rank, 2))
        for _ in range(40):
            next(reader)
        # The checkpoint stores the state as JSON (rank_XXXXX.json): round-trip it the same way.
        snapshot = json.loads(json.dumps(loader.state_dict()))
        expected = [next(reader) for _ in range(8)]
        restored = default_loader_factory(cfg, rank, 2)
        restored.load_state_dict(snapshot)
        got = [b for b, _ in zip(restored, range(8))]
        for e, g in zip(expected, got):
            for name, tensor in e.tensors().items():
                assert torch.equal(tensor, getattr(g, name)), (rank, name)
        if rank == 1:   # the two ranks read different data
            assert not torch.equal(expected[0].actions, first_rank0)
        first_rank0 = expected[0].actions


def test_tiny_vla_two_processes_zero2_then_export(shards, tmp_path):
    from megavla.model.io import load_model
    from megavla.train.cli import launch_local
    from megavla.train.export import consolidated_state_dict, export
    cfg = demo_cfg(shards, tmp_path, "train.steps=4", "train.log_every=1", "train.save_every=2",
                   "train.progress=false", "train.warmup_steps=1", "train.val_every=4", "train.val_batches=1",
                   f"data.val_sources.robot={shards / 'robot'}")
    config = tmp_path / "cfg.yaml"
    from megavla.config import write_yaml
    write_yaml(cfg, config)
    assert launch_local(2, [str(config)]) == 0
    run_dir = tmp_path / "run"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in lines if "loss/total" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    val = [r for r in lines if "val/loss/total" in r]
    assert [r["step"] for r in val] == [4] and "val/flow/robot_arm" in val[0]  # robot-only val set
    for key in ("loss/total", "loss/flow", "optim/lr", "optim/grad_norm", "perf/samples_per_s",
                "time/data_wait_pct", "memory/peak_mb", "data/episodes_read", "data/skipped_bad_shard"):
        assert key in records[-1], key
    assert any(k.startswith("flow/") for k in records[-1])            # per-embodiment flow loss
    assert (run_dir / "tb").is_dir() and any((run_dir / "tb").iterdir())
    ckpt = run_dir / "checkpoints" / "step_000004"
    assert (ckpt / "norm_stats.json").is_file()
    saved_cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved_cfg["train"]["zero_stage"] == 2

    weights = export(run_dir, tmp_path / "export")
    model = load_model(weights.parent)
    consolidated = consolidated_state_dict(ckpt)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, consolidated[name]), name
    # Trained weights differ from a fresh init.
    from megavla.model.vla import build_model
    torch.manual_seed(0)
    fresh = build_model(cfg.model).state_dict()
    assert any(not torch.equal(fresh[n], t) for n, t in model.state_dict().items())


def test_real_pipeline_and_model_resume_exactly(shards, tmp_path, monkeypatch):
    """Tiny VLA + streaming loader (1 worker process), 1 rank in-process: 4 steps straight versus
    2 + `--resume auto` + 2. The model draws flow noise / timesteps from the torch RNG, so this also
    checks that starting the loader's DataLoader on resume does not shift that RNG stream."""
    from megavla.train.entry import run
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)

    def cfg(name: str, *extra: str):
        return demo_cfg(shards, tmp_path / name, "train.steps=4", "train.log_every=1", "train.progress=false",
                        "train.warmup_steps=1", "train.tensorboard=false", "data.num_workers=1", *extra)

    def losses(name: str) -> dict[int, float]:
        lines = (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss/total"] for r in map(json.loads, lines)}

    assert run(cfg("straight")) == 0
    assert run(cfg("split", "train.max_steps_per_run=2")) == 0
    assert run(cfg("split"), resume="auto") == 0
    straight, split = losses("straight"), losses("split")
    assert sorted(split) == [1, 2, 3, 4]
    for step in (3, 4):   # fp32, same data, same RNG: identical up to the JSON round trip
        assert split[step] == pytest.approx(straight[step], rel=1e-6), (step, split, straight)
