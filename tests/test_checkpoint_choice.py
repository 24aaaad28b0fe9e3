"""Which checkpoint: resume, evaluation, serving, export and `sweep status` decide it by one rule
(megavla.train.resume.checkpoint_for / newest_loadable: the newest loadable by step). And what an
export writes: its step, and the writers' overwrite rule (refused unless --overwrite).

The run dir is a real one (tiny VLA, ZeRO-0, 1 rank in process, checkpoints at steps 1, 2, 3).
"""
from __future__ import annotations

import json
import pathlib
import shutil

import pytest

import megavla
from megavla.config import load_config
from megavla.eval.policy import CheckpointError, load_checkpoint
from megavla.launch import rundir
from megavla.train import export as export_cli
from megavla.train.entry import run
from megavla.train.resume import plan_resume

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, monkeypatch_module) -> pathlib.Path:
    from megavla.data.cli import main as data_main
    shards = tmp_path_factory.mktemp("shards")
    assert data_main(["synth", "--out", str(shards), "--scenes", "1", "--tasks", "1", "--episodes-per-combo", "2",
                      "--image-size", "32", "--embodiments", "robot/arm", "--shard-size-mb", "1",
                      "--workers", "1", "--no-progress"]) == 0
    run_dir = tmp_path_factory.mktemp("train") / "run"
    cfg = load_config(CONFIG, [f"data.sources.robot={shards / 'robot'}", f"train.run_dir={run_dir}",
                               "data.batch_size=2", "data.num_workers=0", "train.steps=3", "train.save_every=1",
                               "train.keep_last=3", "train.log_every=1", "train.progress=false",
                               "train.tensorboard=false", "train.warmup_steps=1", "train.zero_stage=0"])
    assert run(cfg) == 0
    return run_dir


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            mp.delenv(var, raising=False)
        yield mp


def choices(run_dir: pathlib.Path, tmp_path: pathlib.Path) -> dict[str, str]:
    """The checkpoint each reader takes from the run dir."""
    out = tmp_path / "export"
    export_cli.export(run_dir, out)
    exported = json.loads((out / "export.json").read_text())
    return {"resume": plan_resume(run_dir, "auto").path.name,
            "eval": load_checkpoint(run_dir).path.name,
            "serve": megavla.load_policy(run_dir).loaded.path.name,
            "export": pathlib.Path(exported["checkpoint"]).name,
            "sweep status": rundir.latest_checkpoint(run_dir)[0]}


def test_a_lagging_latest_pointer_is_not_followed(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    # The saver died between the rename (step 3 committed) and moving `latest`.
    (run_dir / "checkpoints" / "latest").write_text("step_000002")
    assert set(choices(run_dir, tmp_path).values()) == {"step_000003"}


def test_a_damaged_newest_checkpoint_is_skipped_by_every_reader(trained, tmp_path, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    shard = run_dir / "checkpoints" / "step_000003" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:1000])          # truncated; `latest` still names step 3
    got = choices(run_dir, tmp_path)
    assert set(got.values()) == {"step_000002"}, got
    assert "damaged checkpoint skipped" in caplog.text and "mp_rank_00_model_states.pt has 1000 bytes" in caplog.text
    # Asked for by path, the damaged one is refused with the file named, not loaded.
    with pytest.raises(CheckpointError, match="has 1000 bytes"):
        load_checkpoint(run_dir / "checkpoints" / "step_000003")
    assert export_cli.main([str(run_dir / "checkpoints" / "step_000003"), "--out", str(tmp_path / "x")]) == 2


def test_an_export_keeps_its_step(trained, tmp_path):
    out = tmp_path / "export"
    assert export_cli.main([str(trained / "checkpoints" / "step_000002"), "--out", str(out)]) == 0
    record = json.loads((out / "export.json").read_text())
    assert record["step"] == 2 and record["weights"] == "raw"
    assert load_checkpoint(out).step == 2
    assert megavla.load_policy(out).metadata["step"] == 2          # what `megavla serve` tells clients


def test_export_refuses_an_existing_output_unless_overwrite(trained, tmp_path, capsys):
    out = tmp_path / "export"
    assert export_cli.main([str(trained / "checkpoints" / "step_000002"), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert export_cli.main([str(trained), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"megavla export: {out}: already holds an export (") and \
        "choose another directory or pass overwrite (--overwrite)" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before      # untouched

    (out / "NOTES.txt").write_text("mine")
    assert export_cli.main([str(trained), "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "export.json").read_text())["step"] == 3
    assert (out / "NOTES.txt").read_text() == "mine"                                    # not ours: kept
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())

    other = tmp_path / "other"
    other.mkdir()
    (other / "data.bin").write_bytes(b"x")
    assert export_cli.main([str(trained), "--out", str(other)]) == 2
    assert "already holds files (data.bin)" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["data.bin"]
