"""Stop and preemption signals: set a flag in the handler, act at a step boundary on every rank.

Signals only set a flag; at every step boundary the flags are all-reduced (MAX; the one per-step
collective, none at world size 1), so every rank acts at the same step:
- SIGUSR2 (SLURM's warning before preemption / time-out, `--signal=USR2@120`; USR1 is NCCL's):
  a preemption: save and exit EXIT_SIGNAL_SAVED (75); the launcher requeues.
- SIGTERM or SIGINT without any USR2: a stop (scancel, Ctrl-C, kill): save and exit 128 + signal;
  nobody requeues. A second SIGINT aborts at once without saving.
"""
from __future__ import annotations

import os
import signal
from typing import Any

import torch
import torch.distributed as tdist

EXIT_OK = 0
# Exit code after a SIGUSR2 (preemption) checkpoint (sysexits EX_TEMPFAIL: "try again later").
# Launchers treat it as "requeue and resume with --resume auto", not as a failure.
EXIT_SIGNAL_SAVED = 75
# After a SIGTERM / SIGINT stop with a checkpoint saved: 128 + signal, the shell's convention.
EXIT_STOPPED = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


def _several_ranks() -> bool:
    return tdist.is_initialized() and tdist.get_world_size() > 1


class StopFlag:
    """Set by signal handlers; agreed across ranks at step boundaries."""

    def __init__(self) -> None:
        self.signum: int | None = None      # the first signal
        self.preempt = False                # a USR2 arrived (possibly after a TERM)
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in HANDLED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            os.write(2, b"second interrupt: aborting without a checkpoint\n")
            os._exit(128 + signal.SIGINT)
        if signum == signal.SIGUSR2:
            self.preempt = True
        if self.signum is None:
            self.signum = signum
            what = "preemption warning: checkpoint and requeue" if signum == signal.SIGUSR2 else \
                "stop: saving a checkpoint at the end of this step" + \
                (" (Ctrl-C again to abort)" if signum == signal.SIGINT else "")
            os.write(2, f"{signal.Signals(signum).name} ({what})\n".encode())

    def agreed(self, device: torch.device) -> tuple[bool, bool]:
        """(stop, preempt), each True on every rank if True on any: the one per-step collective (one
        host read) when there are several ranks; none at 1."""
        if not _several_ranks():
            return self.signum is not None, self.preempt
        flags = torch.tensor([self.signum is not None, self.preempt], dtype=torch.int32, device=device)
        tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
        stop, preempt = flags.tolist()
        return bool(stop), bool(preempt)


def exit_code_after_save(stop: StopFlag, preempt: bool, device: torch.device) -> int:
    """The exit code once the stop's checkpoint is saved: 75 for a preemption, 128 + signal for a
    stop. submitit's preemption sends TERM then USR2 at once: a USR2 that arrived during the save
    still makes this a preemption."""
    if preempt or stop.agreed(device)[1]:
        return EXIT_SIGNAL_SAVED
    interrupted = torch.tensor([int(stop.signum == signal.SIGINT)], device=device)
    if _several_ranks():
        tdist.all_reduce(interrupted, op=tdist.ReduceOp.MAX)
    return EXIT_STOPPED[signal.SIGINT if interrupted.item() else signal.SIGTERM]
