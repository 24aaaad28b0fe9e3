"""submitit executors from a LaunchConfig, and the checks that run before anything is submitted."""
from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import submitit

from megavla.config import Config, ConfigError, write_yaml
from megavla.config.launch import LaunchConfig

from . import rundir
from .task import TrainTask

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """The job cannot be submitted as asked; the message says why and what to change."""


def _sinfo_partitions() -> dict[str, dict[str, str]]:
    """partition -> {"gres": ..., "default": "1"|""} from `sinfo` (one row per node group)."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P|%G|%D"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LaunchError(f"`sinfo` failed ({e}): is the SLURM controller reachable?") from e
    if out.returncode != 0:
        raise LaunchError(f"`sinfo` failed: {out.stderr.strip() or out.stdout.strip()}")
    partitions: dict[str, dict[str, str]] = {}
    for line in out.stdout.splitlines():
        name, gres, _count = (line.split("|") + ["", ""])[:3]
        default = name.endswith("*")
        name = name.rstrip("*")
        entry = partitions.setdefault(name, {"gres": "", "default": ""})
        if gres and gres != "(null)":
            entry["gres"] = ",".join(filter(None, [entry["gres"], gres]))
        if default:
            entry["default"] = "1"
    return partitions


def preflight(lc: LaunchConfig) -> None:
    """Fail before submission, with a fix, on what SLURM would reject (or silently mis-schedule)."""
    if lc.executor != "slurm":
        if lc.gpus_per_node:
            try:
                import torch
                have = torch.cuda.device_count()
            except ImportError:
                have = 0
            if have < lc.gpus_per_node:
                raise LaunchError(f"--gpus-per-node {lc.gpus_per_node} with the local executor, but this "
                                  f"machine has {have} CUDA device(s); use --gpus-per-node {have}")
        return
    if shutil.which("sbatch") is None:
        raise LaunchError("--executor slurm: no `sbatch` on PATH. Run on a SLURM login node, load the "
                          "slurm module, or use --executor local (slurm/local_cluster.sh start gives a "
                          "local test cluster)")
    partitions = _sinfo_partitions()
    if lc.partition is None:
        default = [p for p, info in partitions.items() if info["default"]]
        if not default:
            raise LaunchError(f"no --partition given and the cluster has no default partition; "
                              f"choose one of {sorted(partitions)}")
        name = default[0]
    else:
        name = lc.partition
        if name not in partitions:
            raise LaunchError(f"--partition {name!r}: sinfo does not know it; partitions are "
                              f"{sorted(partitions)}")
    if lc.gpus_per_node and "gpu" not in partitions[name]["gres"]:
        raise LaunchError(f"--gpus-per-node {lc.gpus_per_node} on partition {name!r}, which has no GPUs "
                          f"(sinfo GRES: {partitions[name]['gres'] or 'none'}); choose a GPU partition "
                          "or use --gpus-per-node 0 with --tasks-per-node N for CPU ranks")


def make_executor(lc: LaunchConfig, folder: str | Path, array_parallelism: int | None = None,
                  name: str | None = None) -> submitit.Executor:
    """A LocalExecutor or SlurmExecutor with one task per rank; logs go to ``folder``."""
    folder = Path(folder)
    tasks = lc.tasks_per_node_effective
    if lc.executor == "local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=lc.max_requeues)
        executor.update_parameters(timeout_min=lc.time_min, tasks_per_node=tasks,
                                   gpus_per_node=lc.gpus_per_node, signal_delay_s=lc.signal_delay_s,
                                   setup=list(lc.setup))
        return executor
    executor = submitit.SlurmExecutor(folder, max_num_timeout=lc.max_requeues)
    params: dict = dict(job_name=name or lc.job_name, nodes=lc.nodes, ntasks_per_node=tasks,
                        time=lc.time_min, signal_delay_s=lc.signal_delay_s, partition=lc.partition,
                        account=lc.account, qos=lc.qos, constraint=lc.constraint,
                        cpus_per_task=lc.cpus_per_task, setup=list(lc.setup) or None,
                        additional_parameters={"requeue": True, **lc.slurm_extra},
                        stderr_to_stdout=False)
    if lc.gpus_per_node:
        params["gpus_per_node"] = lc.gpus_per_node
    if lc.mem_gb is not None:
        params["mem"] = f"{int(lc.mem_gb * 1024)}MB"
    if array_parallelism is not None:
        params["array_parallelism"] = array_parallelism
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def prepare_run(cfg: Config) -> Path:
    """Create the run directory and write the resolved config the job will read."""
    run_dir = cfg.train.require_run_dir().resolve()   # unset: a ConfigError naming train.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.train.run_dir = str(run_dir)
    write_yaml(cfg, run_dir / rundir.CONFIG_FILE)
    return run_dir


def check_run(cfg: Config, resume: str | None, overwrite: bool = False) -> None:
    """What the job would find out minutes later, checked before submission: the paths the run
    reads, model vs data vs tokenizers vs shard sets (megavla.config.checks), a live run holding the
    run dir, nothing to resume in a used run dir. Raises LaunchError."""
    from megavla.config.checks import check_config
    from megavla.train.preflight import check_paths, check_run_dir, check_trainable
    from megavla.train.errors import TrainingError
    try:
        check_paths(cfg)
        check_config(cfg)
        check_run_dir(cfg, resume, overwrite)
        warning = check_trainable(cfg)   # no data.sources, or objectives that need tokenizers
        if warning:
            log.warning("%s", warning)
    except (ConfigError, TrainingError) as e:
        raise LaunchError(str(e)) from None


def submit_run(cfg: Config, resume: str | None = "auto", overwrite: bool = False) -> submitit.Job:
    """Preflight, write the run dir, submit one job of ``world_size`` tasks. Returns the job."""
    try:
        cfg.launch.validate()
    except ConfigError as e:
        raise LaunchError(str(e)) from None
    preflight(cfg.launch)
    if cfg.launch.entry == "megavla.train.entry:run":   # a stand-in trainer has its own rules
        check_run(cfg, None if overwrite else resume, overwrite)
    run_dir = prepare_run(cfg)
    executor = make_executor(cfg.launch, run_dir / rundir.SUBMITIT_DIR, name=run_dir.name)
    rundir.update_launch_record(run_dir, status="submitting")
    job = executor.submit(TrainTask(str(run_dir)), resume, **({"overwrite": True} if overwrite else {}))
    record_submission(run_dir, cfg, job)
    return job


def record_submission(run_dir: Path, cfg: Config, job: submitit.Job) -> None:
    lc = cfg.launch
    rundir.update_launch_record(
        run_dir, status="submitted", status_if=("submitting",), job_id=str(job.job_id), executor=lc.executor,
        nodes_requested=lc.nodes, tasks_per_node=lc.tasks_per_node_effective,
        gpus_per_node=lc.gpus_per_node, partition=lc.partition, git_commit=rundir.git_commit(),
        submitit_folder=str(run_dir / rundir.SUBMITIT_DIR),
        append_event={"event": "submitted", "job_id": str(job.job_id)})
    log.info("submitted %s job %s: %d node(s) x %d task(s), run dir %s", lc.executor, job.job_id,
             lc.nodes, lc.tasks_per_node_effective, run_dir)
