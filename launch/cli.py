"""`megavla launch CONFIG [dotted.overrides] [--executor local|slurm --nodes N ...]`.

Every flag is a shorthand for a ``launch.*`` override, so a YAML file can hold the same settings.
The local executor (default) runs the job on this machine through the same submitit code path as
SLURM and waits for it; on SLURM the command returns after submission unless ``--wait``.
"""
from __future__ import annotations

import argparse
import logging
import sys

from megavla.config import ConfigError, load_config

from .executor import LaunchError, submit_run

log = logging.getLogger(__name__)

# flag -> (launch.<field>, type)
FLAG_FIELDS: dict[str, tuple[str, type]] = {
    "--executor": ("executor", str),
    "--nodes": ("nodes", int),
    "--gpus-per-node": ("gpus_per_node", int),
    "--tasks-per-node": ("tasks_per_node", int),
    "--cpus-per-task": ("cpus_per_task", int),
    "--mem": ("mem_gb", float),
    "--partition": ("partition", str),
    "--account": ("account", str),
    "--qos": ("qos", str),
    "--constraint": ("constraint", str),
    "--time": ("time_min", int),
    "--max-requeues": ("max_requeues", int),
    "--master-addr": ("master_addr", str),
    "--master-port": ("master_port", int),
}


def add_launch_flags(parser: argparse.ArgumentParser) -> None:
    helps = {
        "--executor": "local (default: this machine, same code path) or slurm (sbatch via submitit)",
        "--nodes": "number of nodes (slurm)",
        "--gpus-per-node": "GPUs per node; one rank per GPU (0 = CPU job)",
        "--tasks-per-node": "CPU ranks per node when --gpus-per-node is 0",
        "--cpus-per-task": "CPU cores per rank (data loader workers + 1)",
        "--mem": "memory per node in GB",
        "--partition": "SLURM partition (checked against sinfo)",
        "--account": "SLURM account", "--qos": "SLURM QOS", "--constraint": "SLURM node constraint",
        "--time": "time limit in minutes; USR2 arrives launch.signal_delay_s (120) before it",
        "--max-requeues": "requeues allowed after preemption / time limit",
        "--master-addr": "rendezvous host (default: first node of the job)",
        "--master-port": "rendezvous port (default: derived from the job id)",
    }
    for flag, (_field, tp) in FLAG_FIELDS.items():
        parser.add_argument(flag, type=tp, default=None, help=helps[flag])


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """Flags that were given -> ``launch.field=value`` overrides (flags win over the YAML)."""
    out = []
    for flag, (field, _tp) in FLAG_FIELDS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            out.append(f"launch.{field}={value}")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megavla launch", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config (configs/...)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=2000")
    add_launch_flags(parser)
    parser.add_argument("--resume", default="auto",
                        help="auto (newest complete checkpoint in the run dir, default), a "
                             "checkpoint path, or none (start from scratch)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a run dir that already holds a run (deletes its checkpoints and "
                             "metrics; requeues of this job still resume)")
    wait = parser.add_mutually_exclusive_group()
    wait.add_argument("--wait", dest="wait", action="store_true", default=None,
                      help="wait for the job and return its exit status (default for local)")
    wait.add_argument("--no-wait", dest="wait", action="store_false",
                      help="return after submission (default for slurm)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, [*args.overrides, *flag_overrides(args)])
        resume = None if args.resume in ("none", "") else args.resume
        job = submit_run(cfg, resume=resume, overwrite=args.overwrite)
    except (ConfigError, LaunchError) as e:
        sys.stderr.write(f"megavla launch: error: {e}\n")
        return 2
    print(f"job {job.job_id} ({cfg.launch.executor}): run dir {cfg.train.run_dir}\n"
          f"  logs: {job.paths.stdout}\n  status: megavla sweep status {cfg.train.run_dir}")
    wait = args.wait if args.wait is not None else cfg.launch.executor == "local"
    if not wait:
        return 0
    try:
        results = job.results()
    except Exception as e:  # submitit re-raises the job's traceback as a text error
        log.error("job %s failed: %s", job.job_id, e)
        return 1
    code = max(int(r or 0) for r in results)
    print(f"job {job.job_id} finished with exit code {code}")
    return code
