"""Run-directory bookkeeping the launcher and `sweep status` rely on, and `megavla launch` itself."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from megavla.launch import cli, rundir
from helpers.launch_standin import STANDIN_ENTRY, losses, use_standin


def _checkpoint(run_dir: Path, tag: str, step: int | None, pointer: str = "file") -> None:
    (run_dir / "checkpoints" / tag).mkdir(parents=True)
    if step is not None:
        (run_dir / "checkpoints" / tag / "trainer_state.json").write_text(json.dumps({"step": step}))
    latest = run_dir / "checkpoints" / "latest"
    if pointer == "file":
        latest.write_text(tag + "\n")
    else:
        os.symlink(tag, latest)


def test_latest_checkpoint_is_what_the_trainer_would_resume(tmp_path):
    assert rundir.latest_checkpoint(tmp_path / "none") is None
    _checkpoint(tmp_path / "a", "step_000120", 120)
    assert rundir.latest_checkpoint(tmp_path / "a") == ("step_000120", 120)
    _checkpoint(tmp_path / "b", "step_000007", 7, pointer="symlink")
    assert rundir.latest_checkpoint(tmp_path / "b") == ("step_000007", 7)
    (tmp_path / "c" / "checkpoints").mkdir(parents=True)
    (tmp_path / "c" / "checkpoints" / "latest").write_text("step_9")  # dangling: not a checkpoint
    assert rundir.latest_checkpoint(tmp_path / "c") is None
    # Item 11: `latest` dangles, but a complete checkpoint is there: the trainer resumes it, so
    # status shows it (and the run as interrupted, not new).
    _checkpoint(tmp_path / "d", "step_000005", 5)
    (tmp_path / "d" / "checkpoints" / "latest").write_text("step_000010")
    assert rundir.latest_checkpoint(tmp_path / "d") == ("step_000005", 5)
    rundir.update_launch_record(tmp_path / "d", status="requeued", executor="local", job_id="999999999")
    assert rundir.run_state(tmp_path / "d", 20) == "interrupted"
    _checkpoint(tmp_path / "f", "step_000003", 3)          # trained by `megavla train`: no launch.json
    assert rundir.run_state(tmp_path / "f", 20) == "interrupted"
    # Progress but nothing loadable: the trainer refuses `--resume auto`; status says so.
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "metrics.jsonl").write_text('{"step": 1, "loss/total": 1.0}\n')
    rundir.update_launch_record(tmp_path / "e", status="failed", executor="local", job_id="999999999")
    assert rundir.run_state(tmp_path / "e", 20) == "unresumable"


def test_read_metrics_counts_bad_lines_and_tracks_best_val(tmp_path, caplog):
    lines = [{"step": 1, "loss/total": 3.0}, {"step": 2, "loss/total": 2.5, "val/loss/total": 2.9},
             {"step": 3, "loss/total": 2.0, "val/loss/total": 2.7}, {"step": 4, "loss/total": 1.5}]
    text = "\n".join(json.dumps(x) for x in lines) + '\n{"step": 5, "loss/to'  # cut by a kill
    (tmp_path / "metrics.jsonl").write_text(text)
    summary = rundir.read_metrics(tmp_path)
    assert (summary.step, summary.loss, summary.best_val) == (4, 1.5, 2.7)
    assert (summary.lines, summary.bad_lines) == (4, 1)
    assert "skipped 1 unreadable line(s) of 5" in caplog.text


def test_run_state_transitions(tmp_path):
    assert rundir.run_state(tmp_path, 10) == "new"
    rundir.update_launch_record(tmp_path, status="requeued", executor="local", job_id="999999999")
    assert rundir.run_state(tmp_path, 10) == "new"  # no job, no checkpoint: start over
    _checkpoint(tmp_path, "step_000004", 4)
    assert rundir.run_state(tmp_path, 10) == "interrupted"
    rundir.update_launch_record(tmp_path, job_id=str(os.getpid()))  # a live process: our own
    assert rundir.run_state(tmp_path, 10) == "running"
    assert rundir.run_state(tmp_path, 4) == "finished"


def test_launch_record_keeps_running_status_over_late_submitted(tmp_path):
    rundir.update_launch_record(tmp_path, status="submitting")
    rundir.update_launch_record(tmp_path, status="running", append_event={"event": "start"})
    record = rundir.update_launch_record(tmp_path, status="submitted", status_if=("submitting",),
                                         job_id="5", append_event={"event": "submitted"})
    assert record["status"] == "running" and record["job_id"] == "5"
    assert [e["event"] for e in record["events"]] == ["start", "submitted"]


def test_launch_cli_runs_locally_and_reports_errors(tmp_path, monkeypatch, capsys):
    use_standin(monkeypatch)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"launch: {{entry: '{STANDIN_ENTRY}'}}\ntrain: {{steps: 3, save_every: 0}}\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'nothing'}{os.pathsep}{os.environ['PATH']}")
    assert cli.main([str(cfg), f"train.run_dir={tmp_path / 'run'}", "--tasks-per-node", "1"]) == 0
    assert len(losses(tmp_path / "run")) == 3
    assert "finished with exit code 0" in capsys.readouterr().out
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert cli.main([str(cfg), "--executor", "slurm"]) == 2
    assert "no `sbatch` on PATH" in capsys.readouterr().err
    assert cli.main([str(cfg), "launch.nodez=2"]) == 2
    assert "Did you mean 'nodes'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([])


def test_inherited_master_port_is_not_reused_by_jobs(monkeypatch):
    """sbatch exports the submitting shell's MASTER_PORT to every job: concurrent jobs on one node
    then collide on it (seen: EADDRINUSE when an earlier in-process run had set it)."""
    from megavla.config import load_config
    from megavla.launch.task import setup_distributed_env
    monkeypatch.setenv("_TEST_CLUSTER_", "local")
    for var, value in {"SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": "1",
                       "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0",
                       "SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_LOCALID": "0"}.items():
        monkeypatch.setenv(var, value)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MASTER_PORT", "52987")
    env = setup_distributed_env(load_config())
    assert env.master_port != 52987 and os.environ["MASTER_PORT"] == str(env.master_port)
    again = setup_distributed_env(load_config())  # same job id -> same port on every rank
    assert again.master_port == env.master_port
    pinned = setup_distributed_env(load_config(None, ["launch.master_port=31337"]))
    assert pinned.master_port == 31337
