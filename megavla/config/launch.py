"""Launcher settings (owned by launch/). `megavla launch` flags map onto these fields one to one."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .core import ConfigError


@dataclass
class LaunchConfig:
    # "local": submitit's LocalExecutor on this machine (same code path as SLURM: one process per
    # rank, same signals, same requeue); "slurm": sbatch through submitit.
    executor: Literal["local", "slurm"] = "local"
    nodes: int = 1
    # GPUs per node; one task (rank) per GPU. 0 = CPU job, then `tasks_per_node` CPU ranks per node.
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time_min: int = 60
    job_name: str = "megavla"
    # Seconds before the time limit that SLURM sends USR2 (sbatch --signal=USR2@N). USR1 is never
    # used: NCCL takes it.
    signal_delay_s: int = 120
    # How often a preempted / timed-out run may be requeued before it is left failed.
    max_requeues: int = 5
    # torch.distributed rendezvous host. None = the first node of the job (submitit's choice). Set
    # 127.0.0.1 on a simulated multi-node cluster whose node names do not resolve.
    master_addr: str | None = None
    # Rendezvous port. 0 = derived from the job id (distinct per job). A MASTER_PORT inherited from
    # the submitting shell is ignored: sbatch exports it to every job, so concurrent jobs on one
    # node would collide on it.
    master_port: int = 0
    # The function every rank runs: "module:function" taking (cfg, resume) and returning an exit code.
    entry: str = "megavla.train.entry:run"
    # Exit code with which `entry` says "saved a checkpoint because of SIGTERM/SIGUSR2, requeue me"
    # (the trainer's EXIT_SIGNAL_SAVED; read from the entry's module when it defines it).
    preempted_exit_code: int = 75
    # Shell lines run before the task on every node (module load ..., source venv/bin/activate).
    setup: list[str] = field(default_factory=list)
    # Extra sbatch flags (name without dashes -> value), for what has no field here.
    slurm_extra: dict[str, str] = field(default_factory=dict)

    @property
    def tasks_per_node_effective(self) -> int:
        """Ranks per node: one per GPU on GPU jobs, else `tasks_per_node`."""
        return self.gpus_per_node if self.gpus_per_node > 0 else self.tasks_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node_effective

    def validate(self) -> None:
        for name in ("nodes", "tasks_per_node", "time_min"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("gpus_per_node", "signal_delay_s", "max_requeues"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if self.gpus_per_node and self.tasks_per_node not in (1, self.gpus_per_node):
            raise ConfigError(
                f"tasks_per_node={self.tasks_per_node} with gpus_per_node={self.gpus_per_node}: "
                "GPU jobs run one task per GPU; leave tasks_per_node at 1")
        if self.executor == "local" and self.nodes != 1:
            raise ConfigError(f"nodes={self.nodes}: the local executor runs on one node; "
                              "use --executor slurm for several nodes")
        if ":" not in self.entry:
            raise ConfigError(f"entry={self.entry!r} must look like 'package.module:function'")
        if self.signal_delay_s >= self.time_min * 60:
            raise ConfigError(f"signal_delay_s={self.signal_delay_s} must be shorter than "
                              f"the time limit ({self.time_min} min)")
