"""The resume decision (megavla.train.resume) and the run-dir lock, on hand-made run dirs: no
DeepSpeed, milliseconds per case. What the trainer and `sweep status` resume from is decided here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megavla.train.errors import ResumeError, RunDirBusy
from megavla.train.resume import (MANIFEST_FILE, STATE_FILE, clear_run, file_digests, files_under,
                                  plan_resume)
from megavla.train.run_lock import LOCK_FILE, RunLock


def make_checkpoint(run_dir: Path, step: int, *, world: int = 2, manifest: bool = True) -> Path:
    """A checkpoint dir as the trainer commits it: shards, rank states, manifest, trainer_state."""
    path = run_dir / "checkpoints" / f"step_{step:06d}"
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(os.urandom(256))
    for r in range(world):
        (path / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(os.urandom(512))
        (path / f"rank_{r:05d}.json").write_text(json.dumps({"rank": r, "rng": {}, "loader": None}))
    if manifest:
        names = files_under(path)
        (path / MANIFEST_FILE).write_text(json.dumps({"format": 1, "files": file_digests(path, names)}))
    (path / STATE_FILE).write_text(json.dumps({"step": step, "world_size": world}))
    (run_dir / "checkpoints" / "latest").write_text(path.name)
    return path


def test_unused_run_dir_starts_fresh_with_one_line(tmp_path):
    plan = plan_resume(tmp_path / "run", "auto")
    assert plan.path is None and plan.message == f"no checkpoint in {tmp_path / 'run' / 'checkpoints'}: starting fresh"
    assert plan_resume(tmp_path / "run", None).path is None


def test_auto_takes_the_newest_even_past_a_stale_latest_and_ignores_tmp(tmp_path):
    make_checkpoint(tmp_path, 5)
    make_checkpoint(tmp_path, 10)
    (tmp_path / "checkpoints" / "latest").write_text("step_000005")   # died between rename and pointer
    (tmp_path / "checkpoints" / ".tmp-step_000015").mkdir()            # a torn save
    plan = plan_resume(tmp_path, "auto")
    assert plan.path.name == "step_000010" and plan.step == 10 and plan.verified and not plan.skipped


@pytest.mark.parametrize("damage, named", [
    ("truncate_shard", "zero_pp_rank_1_mp_rank_00_optim_states.pt has 100 bytes"),
    ("delete_shard", "mp_rank_00_model_states.pt is missing"),
    ("delete_rank_state", "rank_00001.json is missing"),
    ("flip_bytes", "zero_pp_rank_0_mp_rank_00_optim_states.pt does not match its sha256"),
    ("truncate_state", "trainer_state.json is not valid JSON"),
])
def test_damaged_newest_falls_back_naming_the_file(tmp_path, damage, named):
    make_checkpoint(tmp_path, 5)
    newest = make_checkpoint(tmp_path, 10)
    if damage == "truncate_shard":
        f = newest / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "delete_shard":
        (newest / "mp_rank_00_model_states.pt").unlink()
    elif damage == "delete_rank_state":
        (newest / "rank_00001.json").unlink()
    elif damage == "flip_bytes":
        f = newest / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        f.write_bytes(bytes(b ^ 0xFF for b in f.read_bytes()))       # same size, other content
    else:
        (newest / STATE_FILE).write_text('{"step": 1')
    plan = plan_resume(tmp_path, "auto")
    assert plan.path.name == "step_000005"
    assert len(plan.skipped) == 1 and named in plan.skipped[0] and "step_000010" in plan.skipped[0]
    assert "skipped damaged" in plan.message
    with pytest.raises(ResumeError, match=named.split(" ")[0]):          # asked for it by path: no fallback
        plan_resume(tmp_path, str(newest))


def test_progress_without_a_loadable_checkpoint_is_an_error(tmp_path):
    make_checkpoint(tmp_path, 5)
    import shutil
    shutil.rmtree(tmp_path / "checkpoints" / "step_000005")              # `latest` left dangling
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    with pytest.raises(ResumeError) as e:
        plan_resume(tmp_path, "auto")
    assert "latest" in str(e.value) and "metrics.jsonl (2 lines)" in str(e.value) and "--overwrite" in str(e.value)


def test_starting_over_in_a_used_run_dir_needs_overwrite(tmp_path):
    make_checkpoint(tmp_path, 5)
    (tmp_path / "metrics.jsonl").write_text('{"step": 5}\n')
    with pytest.raises(ResumeError, match="already holds a run .*--resume auto.*--overwrite"):
        plan_resume(tmp_path, None)
    with pytest.raises(ResumeError, match="cannot be combined"):
        plan_resume(tmp_path, "auto", overwrite=True)
    plan = plan_resume(tmp_path, None, overwrite=True)
    assert plan.overwrite and plan.path is None and "clearing" in plan.message
    clear_run(tmp_path)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert plan_resume(tmp_path, None).path is None


def test_checkpoint_without_manifest_loads_unverified(tmp_path):
    make_checkpoint(tmp_path, 3, manifest=False)
    plan = plan_resume(tmp_path, "auto")
    assert plan.path.name == "step_000003" and not plan.verified and "unverified" in plan.message


def test_resume_path_that_does_not_exist(tmp_path):
    with pytest.raises(ResumeError, match="no such directory"):
        plan_resume(tmp_path, str(tmp_path / "nope"))


# ---- the run-dir lock ---------------------------------------------------------------------------
def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    lock = RunLock(tmp_path).acquire()
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid()
    # A live other process on this host holds it: refused, naming it.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / LOCK_FILE).write_text(json.dumps({**holder, "pid": other.pid, "pid_start": None}))
        with pytest.raises(RunDirBusy, match=f"pid {other.pid} on {holder['host']}"):
            RunLock(tmp_path).acquire()
    finally:
        other.kill()
        other.wait()
    # That process is gone now: the lock is taken over.
    second = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    second.release()
    assert not (tmp_path / LOCK_FILE).exists()
    lock.held = False


def test_lock_is_taken_over_by_the_same_requeued_slurm_job(tmp_path, monkeypatch):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "node7", "pid": 1, "slurm_job_id": "4242",
                                                  "since": "2026-11-30T10:00:00"}))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    RunLock(tmp_path).acquire().release()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "node7", "pid": 1, "slurm_job_id": "4243",
                                                  "since": "2026-11-30T10:00:00"}))
    monkeypatch.setattr("megavla.train.run_lock.slurm_job_queued", lambda job: True)
    with pytest.raises(RunDirBusy, match="SLURM job 4243"):
        RunLock(tmp_path).acquire()


# ---- the CLIs check before any process starts (item 9) and refuse a busy run dir (item 5) -------
def test_cli_names_bad_paths_and_a_busy_run_dir_before_spawning(tmp_path, capsys):
    from megavla.cli import main as megavla
    from megavla.train.cli import main as train
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"train: {{run_dir: {tmp_path / 'run'}}}\n")
    cases = [
        ([f"data.sources.robot={tmp_path / 'nope'}"], f"data.sources.robot={tmp_path / 'nope'}: no such directory"),
        ([f"train.tokenizer_dir={tmp_path / 'tok'}"], f"train.tokenizer_dir={tmp_path / 'tok'}: no such directory"),
        (["--resume", str(tmp_path / "ck")], f"--resume {tmp_path / 'ck'}: no such directory"),
    ]
    for extra, needle in cases:
        assert train([str(cfg), "--nproc", "2", *extra]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "run").mkdir()
        lock = RunLock(tmp_path / "run")
        (tmp_path / "run" / LOCK_FILE).write_text(json.dumps({**lock.mine, "pid": other.pid, "pid_start": None}))
        assert train([str(cfg), "--nproc", "2"]) == 2
        assert f"is in use by pid {other.pid}" in capsys.readouterr().err
    finally:
        other.kill()
        other.wait()
    assert not (tmp_path / "run" / "config.yaml").exists()      # nothing written for a refused run
    assert megavla(["model", "summary", str(tmp_path / "missing.yaml")]) == 2
    assert megavla(["model", "summary", str(cfg), "model.widht=3"]) == 2
    assert megavla(["tokenizer", "train", "--shards", str(tmp_path / "nope"), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Did you mean 'width'" in err and "no such directory" in err
