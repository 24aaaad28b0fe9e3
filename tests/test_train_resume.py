"""Trainer mechanics on 2 local processes (gloo, DeepSpeed ZeRO-2, fp32) with the toy model/loader
of tests/helpers/toy_training.py: exact resume, SIGKILL during a save, SIGTERM -> checkpoint + exit
75, and resume at world size 1 from a world-size-2 checkpoint (DeepSpeed universal checkpoint)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers.toy_training import KILL_IN_SAVE_ENV, STEPS, TOY_WORKER, losses, write_config
from megavla.train.checkpoint import list_checkpoints, read_trainer_state
from megavla.train.cli import launch_local
from megavla.train.stop import EXIT_SIGNAL_SAVED

pytestmark = pytest.mark.distributed


def launch(config: Path, nproc: int = 2, resume: str | None = None, **env) -> int:
    args = [str(config)] + (["--resume", resume] if resume else [])
    return launch_local(nproc, args, env={k: str(v) for k, v in env.items()}, command=TOY_WORKER)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[int, float]:
    tmp = tmp_path_factory.mktemp("straight")
    assert launch(write_config(tmp, "run")) == 0
    got = losses(tmp / "run")
    assert sorted(got) == list(range(1, STEPS + 1))
    return got


def test_kill_during_save_then_exact_resume(tmp_path, straight):
    """Run 1 is SIGKILLed in the middle of writing the step-15 checkpoint (DeepSpeed shards written,
    not committed). `--resume auto` must pick step 10, and steps 11..20 must reproduce the
    uninterrupted run's losses (model, optimizer, schedule, RNG and loader state all restored)."""
    config = write_config(tmp_path, "run")
    run_dir = tmp_path / "run"
    code = launch(config, **{KILL_IN_SAVE_ENV: 15})
    assert code == 137, code                               # SIGKILL
    ckpts = run_dir / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_000005", "step_000010"]
    assert (ckpts / ".tmp-step_000015").is_dir()           # the torn save is there, uncommitted
    assert (ckpts / "latest").read_text() == "step_000010"

    assert launch(config, resume="auto") == 0
    resumed = losses(run_dir)
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_000015", "step_000020"]   # keep_last=2
    assert not (ckpts / ".tmp-step_000015").exists()
    # fp32 on CPU, same ops in the same order with the same data/RNG: bit-identical is expected;
    # the tolerance only absorbs the JSON float round trip of the logged values.
    for step in range(11, STEPS + 1):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7), step
    first, last = [resumed[s] for s in range(1, 6)], [resumed[s] for s in range(16, 21)]
    assert sum(last) < 0.9 * sum(first)                    # and it learns


def test_usr2_on_one_rank_saves_and_resumes_at_world_size_1(tmp_path, straight):
    """SIGUSR2 (preemption warning) reaches rank 1 only, mid-step 7: both ranks agree, save step 7
    and exit 75. Then a 1-process `--resume auto` converts the ZeRO-2 checkpoint to a universal one
    and finishes."""
    config = write_config(tmp_path, "run", global_batch_size=8, keep_last=10)
    run_dir = tmp_path / "run"
    code = launch(config, TOY_SIGTERM_AT_CALL=7, TOY_SIGTERM_RANK=1, TOY_SIGNAL="SIGUSR2")
    assert code == EXIT_SIGNAL_SAVED
    ckpts = run_dir / "checkpoints"
    latest = list_checkpoints(ckpts)[-1]
    state = read_trainer_state(latest)
    assert latest.name == "step_000007" and state["reason"] == "preempted" and state["world_size"] == 2
    assert sorted(losses(run_dir)) == list(range(1, 8))
    # The loss before the signal matches the uninterrupted run (same seeds, same global batch).
    assert losses(run_dir)[7] == pytest.approx(straight[7], rel=1e-6)

    assert launch(config, nproc=1, resume="auto") == 0
    assert (ckpts / ".universal" / "step_000007" / "zero").is_dir()
    after = losses(run_dir)
    assert sorted(after) == list(range(1, STEPS + 1))
    assert read_trainer_state(list_checkpoints(ckpts)[-1])["world_size"] == 1
    # World size 1 reads other batches (the old ranks' streams cannot be split differently), so
    # per-step losses differ; the curve must continue where it was, not restart from scratch.
    tail = [after[s] for s in range(8, STEPS + 1)]
    ref = [straight[s] for s in range(8, STEPS + 1)]
    mean, ref_mean = sum(tail) / len(tail), sum(ref) / len(ref)
    assert abs(mean - ref_mean) < 0.25 * ref_mean, (mean, ref_mean)
    assert mean < 0.9 * sum(straight[s] for s in range(1, 6)) / 5


def test_bad_config_fails_before_any_process(tmp_path, capsys):
    from megavla.train.cli import main
    base = write_config(tmp_path, "run")
    for override, needle in [("train.zero_stag=2", "zero_stage"), ("train.zero_stage=5", "ZeRO stage"),
                             ("train.lr=-1", "lr=-1.0 must be > 0")]:
        assert main([str(base), override, "--nproc", "2"]) == 2
        assert needle in capsys.readouterr().err
    assert main([str(base), "train.global_batch_size=10", "--nproc", "2"]) == 2
    assert "global_batch_size" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()                  # nothing started, nothing written


def test_local_launcher_forwards_signals_and_names_the_failing_rank(tmp_path):
    """The launcher's own plumbing with stand-in workers (no trainer): SIGTERM to the launcher
    reaches every worker and their exit code comes back; when rank 1 fails (exit 3) the launcher
    stops rank 0 (which then dies of SIGTERM: 143), names rank 1 as the first failure with the tail
    of its output, and exits 3, not rank 0's 143."""
    import signal
    import subprocess
    import time
    ready = tmp_path / "ready"
    worker = ("import os, signal, sys, time, pathlib\n"
              "if os.environ['RANK'] == sys.argv[1]:\n"
              "    print('loading shards'); print('ValueError: shard 7 is corrupt', flush=True); sys.exit(3)\n"
              "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75 if sys.argv[1] == '-1' else 143))\n"
              f"pathlib.Path({str(ready)!r} + os.environ['RANK']).touch()\n"
              "time.sleep(60)\n")
    launcher = ("import sys\nfrom megavla.train.cli import launch_local\n"
                f"sys.exit(launch_local(2, [sys.argv[1]], command=[sys.executable, '-c', {worker!r}]))\n")
    proc = subprocess.Popen([sys.executable, "-c", launcher, "-1"])      # no rank fails
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{r}").exists() for r in range(2)) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == EXIT_SIGNAL_SAVED
    t0 = time.monotonic()
    failing = subprocess.run([sys.executable, "-c", launcher, "1"], timeout=60, capture_output=True, text=True)
    assert failing.returncode == 3 and time.monotonic() - t0 < 30   # rank 0 was stopped, not waited out
    assert "rank 1 failed first: exit code 3" in failing.stderr, failing.stderr
    assert "rank 0 exit code 143" in failing.stderr and "| ValueError: shard 7 is corrupt" in failing.stderr


@pytest.mark.slow
def test_nan_loss_on_one_rank_is_skipped_on_both(tmp_path, straight):
    """A NaN loss on rank 1 only at steps 3-4: the reduced gradient norm is NaN on both ranks, so
    both skip the same updates (no divergence between ranks), count them, and finish finite."""
    config = write_config(tmp_path, "run")
    assert launch(config, TOY_NAN_AT_CALLS="3,4", TOY_NAN_RANK=1) == 0
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_nonfinite"] for r in recs][:6] == [0, 0, 1, 2, 2, 2]
    assert "loss/total" not in recs[2] and all(r["loss/total"] == r["loss/total"] for r in recs if "loss/total" in r)
    assert losses(tmp_path / "run")[2] == pytest.approx(straight[2], rel=1e-6)    # same run up to there
