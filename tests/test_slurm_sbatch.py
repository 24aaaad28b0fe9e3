"""slurm/train.sbatch and slurm/train_multinode.sbatch end to end on the local SLURM (no submitit):
srun -> megavla.launch.srun_entry -> trainer (the stand-in of tests/helpers/launch_standin.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.launch_standin import STANDIN_ENTRY, losses, use_standin, wait_for_lines
from helpers.slurm import REPO, standin_reference
from megavla.config import load_config, write_yaml
from megavla.launch import rundir

pytestmark = pytest.mark.slurm


def _sbatch(template: str, tmp_path: Path, env: dict, *flags: str) -> str:
    cfg = load_config(overrides=[f"launch.entry={STANDIN_ENTRY}", "train.save_every=0"])
    write_yaml(cfg, tmp_path / "config.yaml")
    full_env = {**os.environ, "CONFIG": str(tmp_path / "config.yaml"), "RUN_DIR": str(tmp_path / "run"),
                "PYTHON": sys.executable, **env}
    out = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/%j.out", "--gpus-per-node=0",
                          "--cpus-per-task=1", "--time=60", *flags, str(REPO / "slurm" / template)],
                         env=full_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def _wait_gone(job_id: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
        if state.returncode == 0 and not state.stdout.strip():
            return
        time.sleep(0.5)
    subprocess.run(["scancel", job_id])
    raise TimeoutError(f"job {job_id} still in the queue after {timeout_s} s (cancelled)")


@pytest.mark.slow  # CI time: covered in the default suite by the SLURM / real-trainer tests
def test_single_node_template_trains(slurm_cluster, tmp_path, monkeypatch):
    use_standin(monkeypatch)
    # The simulated node names do not resolve: rendezvous on 127.0.0.1 (on a real cluster: unset).
    job = _sbatch("train.sbatch", tmp_path, {"OVERRIDES": "train.steps=5", "MASTER_ADDR": "127.0.0.1"},
                  "--ntasks-per-node=2")
    _wait_gone(job, 120)
    record = rundir.read_launch_record(tmp_path / "run")
    assert record["status"] == "finished" and record["world_size"] == 2 and record["job_id"] == job
    assert losses(tmp_path / "run") == pytest.approx(standin_reference(tmp_path / "ref", 5, monkeypatch),
                                                     rel=1e-5)


def test_multinode_template_requeues_after_usr2_and_resumes(slurm_cluster, tmp_path, monkeypatch):
    """USR2 to every task (what --signal=USR2@120 does at the time limit): save, exit 75, rank 0
    `scontrol requeue`s, the batch script reruns and resumes from the saved step."""
    use_standin(monkeypatch)
    steps = 15
    job = _sbatch("train_multinode.sbatch", tmp_path,
                  {"OVERRIDES": f"train.steps={steps}", "MASTER_ADDR": "127.0.0.1",
                   "MEGAVLA_STANDIN_STEP_S": "0.2"}, "--nodes=2", "--ntasks-per-node=1")
    wait_for_lines(tmp_path / "run" / "metrics.jsonl", 3, timeout_s=120)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    deadline = time.time() + 180
    while rundir.read_launch_record(tmp_path / "run").get("status") != "finished":
        if time.time() > deadline:
            subprocess.run(["scancel", job])
            raise TimeoutError((tmp_path / f"{job}.out").read_text()[-3000:])
        time.sleep(0.5)
    record = rundir.read_launch_record(tmp_path / "run")
    saved = [e["saved_step"] for e in record["events"] if e["event"] == "preempted"]
    resumed = [e["resume_step"] for e in record["events"] if e["event"] == "start" and e["attempt"] > 0]
    assert len(saved) == 1 and resumed == saved and 3 <= saved[0] < steps
    assert record["nodes"] == ["node1", "node2"] and record["attempt"] == 1
    steps_logged = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, steps + 1))
    monkeypatch.setenv("MEGAVLA_STANDIN_STEP_S", "0")
    assert losses(tmp_path / "run") == pytest.approx(
        standin_reference(tmp_path / "ref", steps, monkeypatch), rel=1e-5)
