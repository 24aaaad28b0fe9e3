"""Per-rank entry point for the sbatch templates (users who don't use submitit):

    srun python -m megavla.launch.srun_entry CONFIG [dotted.overrides] [--resume auto]

Maps SLURM's task variables to torch.distributed's (RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS,
LOCAL_RANK = SLURM_LOCALID, MASTER_ADDR = first node of the job, MASTER_PORT from the job id or
launch.master_port; values inherited from the submitting shell are ignored) unless
torchrun set them, runs the trainer entry (``launch.entry``) and, when the trainer
stopped on SIGUSR2/SIGTERM after saving (exit 75), has rank 0 requeue the job with ``scontrol
requeue`` while ``SLURM_RESTART_COUNT < launch.max_requeues``. A plain SIGTERM (scancel) is a stop:
saved, recorded as cancelled, not requeued. The requeued batch script runs again
from the top and ``--resume auto`` picks the checkpoint up. Records launch.json like the submitit path.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from megavla.config import ConfigError, load_config, write_yaml

from . import rundir
from .task import STOPPED_CODES, resolve_entry, restart_count, slurm_requeue_pending

log = logging.getLogger(__name__)


def first_node(nodelist: str) -> str:
    """First hostname of a SLURM node list (``node[1-2],gpu7`` -> ``node1``), via scontrol."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                         timeout=60)
    if out.returncode != 0 or not out.stdout.strip():
        raise RuntimeError(f"scontrol show hostnames {nodelist!r} failed: {out.stderr.strip()}")
    return out.stdout.split()[0]


def export_torch_env(master_addr: str | None, master_port: int = 0) -> None:
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return  # torchrun already set the rendezvous
    # Under srun, RANK / WORLD_SIZE / MASTER_PORT found in the environment were inherited from the
    # submitting shell (sbatch exports it): stale, and the same for every task. Derive them anew.
    env = os.environ
    try:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
    except KeyError as e:
        raise RuntimeError(f"{e.args[0]} is not set: run this under `srun` inside a SLURM job") from None
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("MASTER_ADDR", master_addr or first_node(env["SLURM_JOB_NODELIST"]))
    # A port from the job id: the same on every rank without any communication, stable over requeues.
    env["MASTER_PORT"] = str(master_port or 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megavla.launch.srun_entry", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--resume", default="auto", help="auto (default), a checkpoint path, or none")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        from megavla.cli import setup_logging
        setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.stderr.write(f"srun_entry: error: {e}\n")
        return 2
    run_dir = Path(cfg.train.run_dir).resolve()
    cfg.train.run_dir = str(run_dir)
    export_torch_env(cfg.launch.master_addr, cfg.launch.master_port)
    rank, job_id = int(os.environ["RANK"]), os.environ.get("SLURM_JOB_ID", "")
    attempt = restart_count()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_yaml(cfg, run_dir / rundir.CONFIG_FILE)
        ckpt = rundir.latest_checkpoint(run_dir)
        if attempt:
            log.warning("run %s: requeue %d/%d, resuming from %s", run_dir, attempt,
                        cfg.launch.max_requeues, f"step {ckpt[1]}" if ckpt else "scratch")
        rundir.update_launch_record(
            run_dir, status="running", executor="sbatch", job_id=job_id, attempt=attempt,
            nodes=subprocess.run(["scontrol", "show", "hostnames", os.environ.get("SLURM_JOB_NODELIST", "")],
                                 capture_output=True, text=True).stdout.split(),
            world_size=int(os.environ["WORLD_SIZE"]), git_commit=rundir.git_commit(),
            append_event={"event": "start", "job_id": job_id, "attempt": attempt,
                          "resume_step": ckpt[1] if ckpt else None})
    if attempt > cfg.launch.max_requeues:
        log.error("requeued %d times, more than launch.max_requeues=%d: giving up", attempt,
                  cfg.launch.max_requeues)
        return 1
    entry, preempted_code = resolve_entry(cfg.launch.entry, cfg.launch.preempted_exit_code)
    resume = None if args.resume in ("none", "") else args.resume
    from megavla.train.entry import run_then_shutdown   # ends the process group with every rank
    from megavla.train.errors import TrainingError

    def train() -> int:
        try:
            return int(entry(cfg, resume=resume) or 0)
        except TrainingError as e:   # the same on every rank; run_then_shutdown logs it, exit code 1
            if rank == 0:
                rundir.record_failure(run_dir, str(e))
            raise

    try:
        code = run_then_shutdown(train)
    except Exception as e:   # recorded, so `sweep status` shows it as failed with its cause
        rundir.record_failure(run_dir, f"rank {rank}: {type(e).__name__}: {rundir.one_line(str(e))}")
        raise
    if rank != 0:
        return 0 if code == preempted_code or code in STOPPED_CODES else code
    ckpt = rundir.latest_checkpoint(run_dir)
    if code == 0:
        rundir.update_launch_record(run_dir, status="finished", final_step=ckpt[1] if ckpt else None)
        return 0
    if code in STOPPED_CODES:   # SIGTERM/SIGINT: a stop (scancel), unless SLURM requeues the job itself
        if slurm_requeue_pending(job_id):
            rundir.update_launch_record(run_dir, status="requeued", append_event={
                "event": "preempted", "job_id": job_id, "saved_step": ckpt[1] if ckpt else None})
        else:
            log.warning("stopped at step %s (checkpoint saved, not requeued)", ckpt[1] if ckpt else "?")
            rundir.update_launch_record(run_dir, status="cancelled", append_event={
                "event": "stopped", "job_id": job_id, "saved_step": ckpt[1] if ckpt else None})
        return 0
    if code != preempted_code:
        rundir.record_failure(run_dir, f"trainer exit code {code}")   # unless the cause is recorded
        return code
    rundir.update_launch_record(run_dir, status="requeued", append_event={
        "event": "preempted", "job_id": job_id, "saved_step": ckpt[1] if ckpt else None})
    if attempt >= cfg.launch.max_requeues:
        log.error("not requeued: launch.max_requeues=%d reached", cfg.launch.max_requeues)
        rundir.update_launch_record(run_dir, status="failed", error="max_requeues reached")
        return code
    if job_id:
        requeue = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        if requeue.returncode != 0:  # already being requeued by SLURM (preemption with requeue)
            log.warning("scontrol requeue %s: %s", job_id, requeue.stderr.strip())
        else:
            log.info("requeued job %s after a checkpoint at step %s", job_id, ckpt[1] if ckpt else "?")
    return code


if __name__ == "__main__":
    sys.exit(main())
