"""The launcher against a real SLURM on this host (slurm/local_cluster.sh: 2 simulated nodes).

Skipped, with the reason, when SLURM cannot be installed/started (not root, no apt). `.ci/run`
starts the cluster before pytest; otherwise the session fixture `slurm_cluster` (tests/conftest.py)
starts it (and stops it after). The trainer is the stand-in of tests/helpers/launch_standin.py here; test_slurm_trainer.py runs the real one.
"""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from helpers.launch_standin import STANDIN_ENTRY, losses, use_standin, wait_for_lines
from helpers.slurm import standin_config, standin_reference, wait_all_finished
from megavla.launch import rundir, sweep
from megavla.launch.executor import submit_run

pytestmark = pytest.mark.slurm


@pytest.mark.slow  # CI time: covered in the default suite by the SLURM / real-trainer tests
def test_two_node_job_trains_like_the_local_executor(slurm_cluster, tmp_path, monkeypatch):
    use_standin(monkeypatch)
    job = submit_run(standin_config(tmp_path / "slurm", "train.steps=5", "launch.nodes=2"))
    local = submit_run(standin_config(tmp_path / "local", "train.steps=5", "launch.tasks_per_node=2",
                                      executor="local"))
    assert job.results() == [0, 0] and local.results() == [0, 0]
    assert len(losses(tmp_path / "slurm")) == 5
    assert losses(tmp_path / "slurm") == pytest.approx(losses(tmp_path / "local"), rel=1e-6)
    record = rundir.read_launch_record(tmp_path / "slurm")
    assert record["nodes"] == ["node1", "node2"] and record["world_size"] == 2
    assert record["status"] == "finished" and record["git_commit"]
    assert (tmp_path / "slurm" / "submitit" / f"{job.job_id}_submission.sh").is_file()


def test_preempted_job_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path, monkeypatch):
    """submitit's interrupt (scancel --signal TERM, then USR2, as a preemption does) while training:
    both ranks save at one step, rank 0 requeues (scontrol requeue), the job resumes from that step
    and ends on the uninterrupted curve."""
    use_standin(monkeypatch)
    monkeypatch.setenv("MEGAVLA_STANDIN_STEP_S", "0.2")
    steps = 15
    job = submit_run(standin_config(tmp_path / "run", f"train.steps={steps}", "launch.nodes=2"))
    wait_for_lines(tmp_path / "run" / "metrics.jsonl", 3, timeout_s=120)
    job._interrupt()
    assert job.results() == [0, 0]
    # Job states come through the sacct shim (no accounting daemon); the result file is written
    # just before the processes exit, so give SLURM a moment to call the job COMPLETED.
    deadline = time.time() + 30
    while job.get_info(mode="force").get("State") != "COMPLETED" and time.time() < deadline:
        time.sleep(0.5)
    assert job.get_info(mode="force").get("State") == "COMPLETED"
    record = rundir.read_launch_record(tmp_path / "run")
    saved = [e["saved_step"] for e in record["events"] if e["event"] == "preempted"]
    resumed = [e["resume_step"] for e in record["events"] if e["event"] == "start" and e["attempt"] > 0]
    assert len(saved) == 1 and resumed == saved and 3 <= saved[0] < steps
    assert record["status"] == "finished" and record["attempt"] == 1
    got = losses(tmp_path / "run")
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] \
        == list(range(1, steps + 1))
    monkeypatch.setenv("MEGAVLA_STANDIN_STEP_S", "0")
    assert got == pytest.approx(standin_reference(tmp_path / "ref", steps, monkeypatch), rel=1e-5)


def test_scancel_stops_the_job_without_requeue(slurm_cluster, tmp_path, monkeypatch):
    """A plain `scancel JOBID` is a stop, not a preemption: the ranks save at a step boundary and the
    job ends for good (launch.json: cancelled, the saved step recorded); nothing requeues it."""
    use_standin(monkeypatch)
    monkeypatch.setenv("MEGAVLA_STANDIN_STEP_S", "0.2")
    steps = 40
    job = submit_run(standin_config(tmp_path / "run", f"train.steps={steps}", "launch.nodes=2"))
    wait_for_lines(tmp_path / "run" / "metrics.jsonl", 3, timeout_s=120)
    subprocess.run(["scancel", job.job_id], check=True)
    deadline = time.time() + 60
    while subprocess.run(["squeue", "-h", "-j", job.job_id], capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline, "cancelled job still in the queue"
        time.sleep(0.5)
    time.sleep(3)   # a requeued job would be back in the queue by now (sched_interval=2)
    assert not subprocess.run(["squeue", "-h", "-j", job.job_id], capture_output=True, text=True).stdout.strip()
    record = rundir.read_launch_record(tmp_path / "run")
    stopped = [e for e in record["events"] if e["event"] == "stopped"]
    assert record["status"] == "cancelled" and record["attempt"] == 0, record
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGTERM"
    assert not [e for e in record["events"] if e["event"] == "preempted"]
    saved = stopped[0]["saved_step"]
    assert 3 <= saved < steps and rundir.latest_checkpoint(tmp_path / "run") == (f"step_{saved:06d}", saved)


def test_sweep_is_one_job_array_and_rerun_submits_nothing(slurm_cluster, tmp_path, monkeypatch, capsys):
    use_standin(monkeypatch)
    spec = tmp_path / "sweep.yaml"
    spec.write_text(json.dumps({
        "out_dir": str(tmp_path / "sw"),
        "overrides": [f"launch.entry={STANDIN_ENTRY}", "train.save_every=0"],
        "grid": {"train.steps": [3, 4], "train.seed": [0, 1]}}))
    assert sweep.main([str(spec), "--executor", "slurm", "--master-addr", "127.0.0.1"]) == 0
    assert "submitted job array" in capsys.readouterr().out
    rows = wait_all_finished(tmp_path / "sw", 4, timeout_s=180)
    assert [r["run"] for r in rows] == ["steps-3_seed-0", "steps-3_seed-1", "steps-4_seed-0", "steps-4_seed-1"]
    assert [r["step"] for r in rows] == ["3/3", "3/3", "4/4", "4/4"]
    array_ids = {r["job"].split("_")[0] for r in rows}
    assert len(array_ids) == 1 and sorted(r["job"].split("_")[1] for r in rows) == ["0", "1", "2", "3"]
    assert sweep.submit_sweep(spec, ["launch.executor=slurm"]) == []  # re-run: nothing submitted
    assert sweep.main(["status", str(tmp_path / "sw")]) == 0
    assert sum(" finished " in line for line in capsys.readouterr().out.splitlines()) == 4


@pytest.mark.slow
def test_scontrol_requeue_checkpoints_and_resumes(slurm_cluster, tmp_path, monkeypatch):
    """An admin/preemption requeue by SLURM itself (SIGTERM, then SIGKILL after KillWait=5 s): the
    ranks save in time, rank 0's own requeue is refused (already requeueing) and is not an error,
    the job comes back and resumes from the saved step."""
    use_standin(monkeypatch)
    monkeypatch.setenv("MEGAVLA_STANDIN_STEP_S", "0.2")
    steps = 15
    job = submit_run(standin_config(tmp_path / "run", f"train.steps={steps}", "launch.nodes=2"))
    wait_for_lines(tmp_path / "run" / "metrics.jsonl", 3, timeout_s=120)
    subprocess.run(["scontrol", "requeue", job.job_id], check=True)
    deadline = time.time() + 180
    while rundir.read_launch_record(tmp_path / "run").get("status") != "finished":
        assert time.time() < deadline, "requeued job did not finish"
        time.sleep(0.5)
    record = rundir.read_launch_record(tmp_path / "run")
    saved = [e["saved_step"] for e in record["events"] if e["event"] == "preempted"]
    resumed = [e["resume_step"] for e in record["events"] if e["event"] == "start" and e["attempt"] > 0]
    assert len(saved) == 1 and resumed == saved and 3 <= saved[0] < steps
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] \
        == list(range(1, steps + 1))
