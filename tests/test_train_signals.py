"""Stopping a local run: Ctrl-C (SIGINT to the launcher's process group, as a terminal sends it)
saves at the step boundary and exits 130 without a traceback; a second Ctrl-C aborts at once;
SIGTERM to the whole group saves and exits 143; data-loader workers ignore both signals."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megavla.train.checkpoint import list_checkpoints, read_trainer_state
from megavla.train.resume import plan_resume
from helpers.launch_standin import wait_for_lines
from helpers.toy_training import TOY_WORKER, write_config

pytestmark = pytest.mark.distributed


def start_launcher(config: Path, *extra: str) -> subprocess.Popen:
    """`launch_local` with the toy workers, in a new session: we signal its whole process group.
    Output goes to CONFIG.log (a pipe nobody reads would block the workers)."""
    code = ("import sys\nfrom megavla.train.cli import launch_local\n"
            f"sys.exit(launch_local(2, sys.argv[1:], command={TOY_WORKER!r}))\n")
    with open(config.with_suffix(".log"), "w") as out:
        return subprocess.Popen([sys.executable, "-c", code, str(config), *extra], start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, config: Path) -> tuple[int, str]:
    try:
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, config.with_suffix(".log").read_text()


def stop_group(proc: subprocess.Popen, config: Path, *signals: int) -> tuple[int, str]:
    wait_for_lines(config.with_name(config.stem) / "metrics.jsonl", 3, timeout_s=300)
    for sig in signals:
        os.killpg(proc.pid, sig)
        time.sleep(0.01)
    return finish(proc, config)


def test_ctrl_c_saves_at_the_step_boundary_and_resumes(tmp_path):
    config = write_config(tmp_path, "run", steps=2000, save_every=0)
    run_dir = tmp_path / "run"
    code, out = stop_group(start_launcher(config), config, signal.SIGINT)
    assert code == 130, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    saved = list_checkpoints(run_dir / "checkpoints")
    assert len(saved) == 1 and read_trainer_state(saved[0])["reason"] == "stopped"
    step = read_trainer_state(saved[0])["step"]
    assert 3 <= step < 2000
    assert plan_resume(run_dir, "auto").path == saved[0]    # what `--resume auto` continues from
    assert not (run_dir / ".run.lock").exists()             # released on the way out


@pytest.mark.slow
def test_second_ctrl_c_aborts_and_sigterm_to_the_group_saves(tmp_path):
    config = write_config(tmp_path, "a", steps=2000, save_every=0)
    code, out = stop_group(start_launcher(config), config, signal.SIGINT, signal.SIGINT)
    assert code == 130 and "second interrupt: aborting without a checkpoint" in out, out[-3000:]
    config = write_config(tmp_path, "b", steps=2000, save_every=0)
    code, out = stop_group(start_launcher(config), config, signal.SIGTERM)
    assert code == 143 and "Traceback" not in out, out[-3000:]
    assert read_trainer_state(list_checkpoints(tmp_path / "b" / "checkpoints")[-1])["reason"] == "stopped"


def test_loader_workers_ignore_stop_signals_sent_to_the_group(tmp_path):
    """The real pipeline with 1 worker process: SIGINT and SIGTERM to the process group (what a
    terminal / `kill -- -PGID` / scancel does) leave the worker alive, the trainer decides when to
    stop; and the process still exits promptly (the parent's own terminate() ends the worker)."""
    script = f"""
import os, signal, subprocess, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from helpers.shard_sets import grid_episodes, make_cfg, write_shard_set
from megavla.data.pipeline import build_loader
root = {str(tmp_path)!r}
robot = write_shard_set(root + "/robot", grid_episodes(2, 2, 2, steps=10), per_shard=2)
human = write_shard_set(root + "/human", grid_episodes(2, 2, 1, human=True, steps=10), per_shard=2)
seen = []
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda s, f: seen.append(s))      # the trainer's handlers only set a flag
it = iter(build_loader(make_cfg((str(robot), str(human)), num_workers=1), None, None))
next(it)
for sig in ("-INT", "-TERM"):   # from another process, as a shell or slurmstepd sends them
    subprocess.run(["kill", sig, "--", f"-{{os.getpgrp()}}"], check=True, start_new_session=True)
for _ in range(20):
    next(it)
print("batches after the signals: ok", len(seen))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                          start_new_session=True)    # a worker that ignored its parent's SIGTERM hangs here
    assert done.returncode == 0 and "batches after the signals: ok 2" in done.stdout, done.stderr[-3000:]
