"""What every rank of a launched job runs: set up torch.distributed from the job, call the trainer.

Stop vs preemption (docs/launching.md, "Stopping, preemption and failures"):
- SIGTERM alone (scancel, kill) is a *stop*: the trainer saves at the next step boundary and returns
  128 + 15. Rank 0 then asks SLURM whether it is requeueing the job (`scontrol requeue`, preemption
  with requeue: SLURM bumps the job's Restarts before signalling). If so the run is recorded as
  preempted and SLURM brings it back; otherwise it is recorded as cancelled and nothing requeues.
- SIGUSR2 (`--signal=USR2@120`, or submitit's interrupt: TERM then USR2) is a *preemption*:

Preemption / time limit, end to end:
1. SLURM (or the local controller) sends SIGUSR2 ``signal_delay_s`` before the limit. The trainer's
   own handler (installed inside ``run``) sets a flag, the ranks agree at the next step boundary,
   save, and ``run`` returns the trainer's ``EXIT_SIGNAL_SAVED`` code (75).
2. Rank 0 then hands over to submitit's USR2 handler (saved before the trainer replaced it): it calls
   :meth:`TrainTask.checkpoint`, which returns the same task with ``resume="auto"`` and one more
   requeue counted, pickles it and runs ``scontrol requeue`` (locally: exit code 144, which makes the
   local controller restart every rank).
3. The requeued job loads the newest complete checkpoint; rank 0 logs and records (launch.json
   ``events``) the step it resumed from. After ``max_requeues`` requeues ``checkpoint`` returns None
   and the job ends as failed instead of looping.
A signal that lands before the trainer installed its handler reaches submitit's handler directly:
same requeue, resuming from the last periodic checkpoint.
"""
from __future__ import annotations

import importlib
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import submitit

from megavla.config import Config, load_config

from . import rundir

log = logging.getLogger(__name__)


def resolve_entry(spec: str, default_preempted_code: int) -> tuple[Callable[..., int], int]:
    """``"pkg.module:function"`` -> (function, its "saved on a signal" exit code: the module's
    EXIT_SIGNAL_SAVED / EXIT_PREEMPTED, else ``default_preempted_code``)."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RuntimeError(f"launch.entry={spec!r}: cannot import {module_name!r} ({e})") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RuntimeError(f"launch.entry={spec!r}: {module_name} has no function {attr!r}")
    code = getattr(module, "EXIT_SIGNAL_SAVED", getattr(module, "EXIT_PREEMPTED", default_preempted_code))
    return fn, int(code)


def setup_distributed_env(cfg: Config) -> submitit.helpers.TorchDistributedEnvironment:
    """Export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from the submitit job.

    CUDA_VISIBLE_DEVICES is left alone (all of the node's GPUs stay visible): the trainer picks
    ``cuda:LOCAL_RANK``, which would not exist if each rank saw only its own GPU.
    ``overwrite=True`` because a requeued local task inherits nothing, but a job launched from inside
    another job (a sweep driver in an allocation) would otherwise refuse to start.
    """
    # submitit honours an existing MASTER_PORT; one inherited from the submitting environment is
    # stale and shared by every job submitted from it, so derive the port from the job id instead.
    os.environ.pop("MASTER_PORT", None)
    if cfg.launch.master_port:
        os.environ["MASTER_PORT"] = str(cfg.launch.master_port)
    dist_env = submitit.helpers.TorchDistributedEnvironment()
    dist_env.export(set_cuda_visible_devices=False, overwrite=True)
    if cfg.launch.master_addr:
        os.environ["MASTER_ADDR"] = cfg.launch.master_addr
    return dist_env


# Trainer exit codes after a SIGINT / SIGTERM stop (checkpoint saved): 128 + signal.
STOPPED_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)
# After a stop, how long rank 0 waits for a late SIGUSR2 (submitit's interrupt sends TERM, then USR2).
LATE_USR2_GRACE_S = 1.0


def slurm_requeue_pending(job_id: str | None) -> bool:
    """Is SLURM requeueing this job (rather than cancelling it)? A requeue increments the job's
    Restarts at once, so it exceeds this process's SLURM_RESTART_COUNT."""
    if not job_id:
        return False
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    m = re.search(r"\bRestarts=(\d+)", out.stdout)
    return bool(m) and int(m.group(1)) > restart_count()


def restart_count() -> int:
    """How often SLURM has restarted this job (requeues by SLURM itself count too)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


class TrainTask(submitit.helpers.Checkpointable):
    """The submitted callable. Holds only the run directory: the config is read from its
    config.yaml on every (re)start, so nothing but a path and a counter is pickled by submitit."""

    def __init__(self, run_dir: str, requeues: int = 0) -> None:
        self.run_dir = str(run_dir)
        self.requeues = requeues

    def _config(self) -> Config:
        return load_config(Path(self.run_dir) / rundir.CONFIG_FILE)

    def __call__(self, resume: str | None = "auto", overwrite: bool = False) -> int:
        if not logging.getLogger().handlers:  # a fresh job process: same log format as the CLI
            from megavla.cli import setup_logging
            setup_logging()
        cfg = self._config()
        job_env = submitit.JobEnvironment()
        dist_env = setup_distributed_env(cfg)
        rank = dist_env.rank
        attempt = max(self.requeues, restart_count())
        if rank == 0:
            self._record_start(cfg, job_env, dist_env, attempt, resume)
        if attempt > cfg.launch.max_requeues:
            msg = f"requeued {attempt} times, more than launch.max_requeues={cfg.launch.max_requeues}"
            if rank == 0:
                rundir.update_launch_record(self.run_dir, status="failed", error=msg)
            raise RuntimeError(msg)

        entry, preempted_code = resolve_entry(cfg.launch.entry, cfg.launch.preempted_exit_code)
        submitit_usr2 = signal.getsignal(job_env._usr_sig())
        # --overwrite applies to the first start only: a requeued attempt must resume, never wipe.
        extra = {"overwrite": True} if overwrite and attempt == 0 else {}
        from megavla.train.engine import shutdown_distributed
        from megavla.train.errors import TrainingError
        try:
            code = int(entry(cfg, resume=None if extra else resume, **extra) or 0)
        except TrainingError as e:      # the same on every rank: rank 0 records it, one line each
            shutdown_distributed(wait_for_peers=False)
            if rank == 0:
                rundir.record_failure(self.run_dir, str(e))
            raise RuntimeError(f"run {self.run_dir}: {e}") from None
        except Exception as e:          # a bug or a check the trainer lacks: any rank may be first
            shutdown_distributed(wait_for_peers=False)
            rundir.record_failure(self.run_dir, f"rank {rank}: {type(e).__name__}: {rundir.one_line(str(e))}")
            raise
        shutdown_distributed()   # every rank got here: no rank exits while a peer still uses the group

        if code == 0:
            if rank == 0:
                ckpt = rundir.latest_checkpoint(self.run_dir)
                rundir.update_launch_record(self.run_dir, status="finished",
                                            final_step=ckpt[1] if ckpt else None)
            return 0
        if code == preempted_code:
            return self._after_preemption(rank, submitit_usr2, job_env)
        if code in STOPPED_CODES:
            return self._after_stop(rank, code, job_env)
        if rank == 0:
            rundir.record_failure(self.run_dir, f"trainer exit code {code}")
        raise RuntimeError(f"trainer {cfg.launch.entry} exited with code {code} (run dir {self.run_dir})")

    def _record_start(self, cfg: Config, job_env: Any, dist_env: Any, attempt: int,
                      resume: str | None) -> None:
        ckpt = rundir.latest_checkpoint(self.run_dir) if resume else None
        event: dict[str, Any] = {"event": "start", "job_id": job_env.job_id, "attempt": attempt,
                                 "resume_step": ckpt[1] if ckpt else None}
        if attempt > 0:
            where = f"step {ckpt[1]} ({ckpt[0]})" if ckpt else "scratch (no checkpoint found)"
            log.warning("run %s: requeue %d/%d, resuming from %s", self.run_dir, attempt,
                        cfg.launch.max_requeues, where)
        elif ckpt:
            log.info("run %s: resuming from step %d (%s)", self.run_dir, ckpt[1], ckpt[0])
        rundir.update_launch_record(
            self.run_dir, status="running", job_id=job_env.job_id, attempt=attempt,
            nodes=list(job_env.hostnames), world_size=dist_env.world_size,
            master=f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", append_event=event)

    def _after_stop(self, rank: int, code: int, job_env: Any) -> int:
        """The trainer saved because of SIGTERM/SIGINT: a stop, unless SLURM is requeueing the job."""
        if rank != 0:
            return 0
        time.sleep(LATE_USR2_GRACE_S)   # a USR2 now reaches submitit's handler: preemption, requeue
        ckpt = rundir.latest_checkpoint(self.run_dir)
        saved = ckpt[1] if ckpt else None
        if slurm_requeue_pending(job_env.job_id):
            log.warning("run %s: SLURM is requeueing job %s; saved step %s", self.run_dir, job_env.job_id, saved)
            rundir.update_launch_record(self.run_dir, status="requeued", append_event={
                "event": "preempted", "job_id": job_env.job_id, "saved_step": saved})
        else:
            log.warning("run %s: stopped by %s at step %s (checkpoint saved, not requeued); resume with the "
                        "same launch command", self.run_dir, signal.Signals(code - 128).name, saved)
            rundir.update_launch_record(self.run_dir, status="cancelled", append_event={
                "event": "stopped", "job_id": job_env.job_id, "signal": signal.Signals(code - 128).name,
                "saved_step": saved})
        return 0

    def _after_preemption(self, rank: int, submitit_usr2: Any, job_env: Any) -> int:
        """The trainer saved because of a signal: rank 0 requeues through submitit's handler."""
        if rank != 0:
            return 0
        ckpt = rundir.latest_checkpoint(self.run_dir)
        rundir.update_launch_record(self.run_dir, status="requeued",
                                    append_event={"event": "preempted", "job_id": job_env.job_id,
                                                  "saved_step": ckpt[1] if ckpt else None})
        # A late second signal (interrupts send TERM then USR2) must not requeue the job twice.
        signal.signal(job_env._usr_sig(), signal.SIG_IGN)
        if not callable(submitit_usr2):
            log.warning("preempted outside a submitit job: not requeued (resume with --resume auto)")
            return 0
        try:
            # Calls self.checkpoint(), dumps the new submission, requeues, then sys.exit(-1).
            submitit_usr2(job_env._usr_sig(), None)
        except subprocess.CalledProcessError as e:
            # `scontrol requeue` refused: SLURM is already requeueing this job (scontrol requeue
            # or a preemption with requeue). The dumped submission resumes with "auto" anyway.
            log.warning("scontrol requeue failed (%s); SLURM is requeueing the job itself", e)
            raise SystemExit(-1) from None
        return 0

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:
        max_requeues = self._config().launch.max_requeues
        if self.requeues >= max_requeues:
            log.error("run %s: not requeued, launch.max_requeues=%d reached", self.run_dir, max_requeues)
            rundir.update_launch_record(self.run_dir, status="failed",
                                        error=f"preempted after {max_requeues} requeues")
            return None
        return submitit.helpers.DelayedSubmission(TrainTask(self.run_dir, self.requeues + 1), "auto")
