"""A stand-in for `megavla.train.entry.run` with the same contract, so the launcher machinery is
tested without the real model: reads RANK/WORLD_SIZE/MASTER_* from the environment, trains a tiny
linear regression with gloo all-reduce, writes metrics.jsonl and checkpoints/<tag>/ + latest the way
the trainer does, saves at a step boundary on SIGUSR2/SIGTERM with all ranks agreeing and returns
EXIT_SIGNAL_SAVED after a USR2 (preemption), 128 + SIGTERM after a TERM alone (a stop);
resume="auto" continues from checkpoints/latest.

Jobs import it as module `helpers.launch_standin` (use_standin puts tests/ on PYTHONPATH), via
`launch.entry=helpers.launch_standin:run`. Set MEGAVLA_STANDIN_STEP_S to slow steps down.
tests/test_launch_standin.py checks the stand-in keeps the contract.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

EXIT_SIGNAL_SAVED = 75  # the trainer's code for 'saved on a signal, requeue me'
_DIM = 8


def _batch(step: int, rank: int, world: int, global_batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of `step`, split by rank: results do not depend on the world size."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(global_batch, _DIM, generator=g)
    y = x @ torch.arange(1.0, _DIM + 1) + 0.1 * torch.randn(global_batch, generator=g)
    per = global_batch // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def save_checkpoint(run_dir: Path, step: int, w: torch.Tensor) -> None:
    ckpt = run_dir / "checkpoints"
    tag = f"step_{step:06d}"   # the trainer's tag format: launch/rundir reads checkpoints the trainer's way
    tmp = ckpt / f".{tag}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({"w": w.contiguous()}, str(tmp / "weights.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
    if (ckpt / tag).exists():
        import shutil
        shutil.rmtree(ckpt / tag)
    tmp.rename(ckpt / tag)
    (ckpt / ".latest.tmp").write_text(tag)
    (ckpt / ".latest.tmp").replace(ckpt / "latest")  # the pointer moves last


def run(cfg, resume: str | None = None) -> int:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("gloo")
    run_dir = Path(cfg.train.run_dir)
    stop = {"flag": False, "usr2": False}

    def on_signal(signum, frame):  # noqa: ARG001 - signal handler signature
        stop["flag"] = True
        stop["usr2"] = stop["usr2"] or signum == signal.SIGUSR2

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGUSR2, signal.SIGTERM)}
    w, start = torch.zeros(_DIM), 0
    latest = run_dir / "checkpoints" / "latest"
    if resume == "auto" and latest.is_file():
        tag = latest.read_text().strip()
        w = load_file(str(run_dir / "checkpoints" / tag / "weights.safetensors"))["w"]
        start = json.loads((run_dir / "checkpoints" / tag / "trainer_state.json").read_text())["step"]
    step_s = float(os.environ.get("MEGAVLA_STANDIN_STEP_S", "0"))
    end = cfg.train.steps
    if cfg.train.max_steps_per_run:
        end = min(end, start + cfg.train.max_steps_per_run)
    code = 0
    for step in range(start, end):
        x, y = _batch(step, rank, world)
        w.requires_grad_(True)
        loss = ((x @ w - y) ** 2).mean()
        loss.backward()
        grad, loss_value = w.grad.detach().clone(), loss.detach().clone()
        flag = torch.tensor([1.0 if stop["flag"] else 0.0, 1.0 if stop["usr2"] else 0.0])
        if world > 1:
            for t in (grad, loss_value):
                dist.all_reduce(t)
                t /= world
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        w = (w.detach() - 0.01 * grad)
        if rank == 0:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step + 1, "loss": loss_value.item()}) + "\n")
        done = step + 1
        if flag[0].item() > 0:
            if rank == 0:
                save_checkpoint(run_dir, done, w)
            # Like the trainer: USR2 (also one that arrives during the save) = preemption, else a stop.
            late = torch.tensor([1.0 if stop["usr2"] else 0.0])
            if world > 1:
                dist.all_reduce(late, op=dist.ReduceOp.MAX)
            code = EXIT_SIGNAL_SAVED if max(flag[1].item(), late.item()) > 0 else 128 + signal.SIGTERM
            break
        if rank == 0 and cfg.train.save_every and done % cfg.train.save_every == 0:
            save_checkpoint(run_dir, done, w)
        time.sleep(step_s)
    else:
        if rank == 0:
            save_checkpoint(run_dir, end, w)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    return code


# Helpers the launcher tests share.
TESTS_DIR = Path(__file__).resolve().parents[1]
STANDIN_ENTRY = "helpers.launch_standin:run"


def use_standin(monkeypatch) -> None:
    """Make job processes (local or SLURM: both inherit the environment) able to import this module."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS_DIR),
                                                                   os.environ.get("PYTHONPATH")])))


def losses(run_dir) -> list[float]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if line.strip()]


def wait_for_lines(path: Path, n: int, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{path} did not reach {n} lines in {timeout_s} s")
