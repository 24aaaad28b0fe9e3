"""A toy flow-matching model and a deterministic, resumable loader that exercise the trainer's
mechanics (DeepSpeed, checkpoints, signals, resume) independently of the real model/pipeline.

Run as a script it is a training worker: `python tests/helpers/toy_training.py CONFIG [--resume X]`
(what `launch_local(..., command=TOY_WORKER)` starts on each rank); ``write_config`` writes the
config of such a run and ``losses`` reads its curve back.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from megavla.batch import Batch
from megavla.config import load_config

A, H, S = 4, 3, 5
CAMERAS, PIXELS = 3, 8  # data.cameras' default count: training batches get image augmentation


class ToyVLA(nn.Module):
    """Flow matching on actions given state: x_t = t*noise + (1-t)*a, predict v = noise - a.
    Uses the torch RNG (noise, t) so exact resume also tests RNG restore; reads the images (mean
    colour per camera), so exact resume also covers the trainer's random image augmentation."""

    def __init__(self, cfg=None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(S + H * A + 1 + 3 * CAMERAS, 64), nn.GELU(), nn.Linear(64, H * A))
        self.norm = nn.LayerNorm(S)
        self.calls = 0

    def forward(self, batch: Batch) -> dict:
        # Test hooks: a signal (TOY_SIGNAL, default SIGTERM) to this rank only, mid-step (the trainer
        # must agree on it across ranks); a NaN loss on this rank at the listed forward calls.
        self.calls += 1
        rank = os.environ.get("RANK", "0")
        if self.training and os.environ.get("TOY_SIGTERM_AT_CALL") == str(self.calls) and \
                rank == os.environ.get("TOY_SIGTERM_RANK", "0"):
            os.kill(os.getpid(), getattr(signal, os.environ.get("TOY_SIGNAL", "SIGTERM")))
        poison = self.training and rank == os.environ.get("TOY_NAN_RANK", "0") and \
            str(self.calls) in os.environ.get("TOY_NAN_AT_CALLS", "").split(",")
        a = batch.actions
        b = a.shape[0]
        noise = torch.randn(a.shape, dtype=a.dtype, device=a.device)
        t = torch.rand(b, 1, 1, dtype=a.dtype, device=a.device)
        x_t = t * noise + (1 - t) * a
        dtype = self.net[0].weight.dtype
        colour = batch.images.to(dtype).mean(dim=(3, 4)).flatten(1) / 255.0
        inp = torch.cat([self.norm(batch.state.to(dtype)), x_t.flatten(1).to(dtype), t.flatten(1).to(dtype),
                         colour], 1)
        v = self.net(inp).view(b, H, A).float()
        per_sample = ((v - (noise - a)) ** 2).mean(dim=(1, 2))
        if poison:
            per_sample = per_sample * float("nan")
        out = {"loss": per_sample.mean(), "flow": per_sample.mean().detach()}
        for emb in batch.embodiment.unique().tolist():
            out[f"flow/emb{emb}"] = per_sample[batch.embodiment == emb].mean().detach()
        return out


def toy_batch(seed: int, rank: int, index: int, batch_size: int) -> Batch:
    g = torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + index)
    b = batch_size
    state = torch.randn(b, S, generator=g)
    # A learnable relation: actions are a fixed function of state.
    actions = torch.tanh(state[:, :A, None] * torch.linspace(0.5, 1.5, H)).transpose(1, 2).contiguous()
    images = torch.randint(0, 256, (b, CAMERAS, 3, PIXELS, PIXELS), dtype=torch.uint8, generator=g)
    return Batch(
        images=images, image_mask=torch.ones(b, CAMERAS, dtype=torch.bool),
        text_tokens=torch.zeros(b, 2, dtype=torch.long), text_mask=torch.ones(b, 2, dtype=torch.bool),
        state=state, state_mask=torch.ones(b, S, dtype=torch.bool), actions=actions,
        action_dim_mask=torch.ones(b, A, dtype=torch.bool), action_time_mask=torch.ones(b, H, dtype=torch.bool),
        fast_tokens=torch.zeros(b, 2, dtype=torch.long), fast_mask=torch.ones(b, 2, dtype=torch.bool),
        subtask_tokens=torch.zeros(b, 2, dtype=torch.long), subtask_mask=torch.ones(b, 2, dtype=torch.bool),
        embodiment=torch.randint(0, 2, (b,), generator=g), meta={})


class ToyLoader:
    """Endless, deterministic per (seed, rank, index); JSON state like the real StreamingLoader."""

    def __init__(self, seed: int, rank: int, world_size: int, batch_size: int):
        self.seed, self.rank, self.world_size, self.batch_size = seed, rank, world_size, batch_size
        self.index = 0

    def __iter__(self):
        while True:
            batch = toy_batch(self.seed, self.rank, self.index, self.batch_size)
            self.index += 1
            yield batch

    def state_dict(self) -> dict:
        return {"index": self.index, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        assert state["world_size"] == self.world_size
        self.index = int(state["index"])

    def skip_counts(self) -> dict:
        return {"bad_sample": 0}


def toy_loader_factory(cfg, rank, world_size, seed=None, split="train"):
    return ToyLoader(cfg.data.seed if seed is None else seed, rank, world_size, cfg.data.batch_size)


def toy_model_factory(cfg):
    return ToyVLA(cfg)


TOY_WORKER = [sys.executable, str(Path(__file__).resolve())]   # this file as a script, on each rank
STEPS = 20


def write_config(tmp: Path, name: str, **train) -> Path:
    cfg = {"data": {"batch_size": 4, "seed": 1},
           "train": {"run_dir": str(tmp / name), "steps": STEPS, "zero_stage": 2, "precision": "fp32",
                     "lr": 1e-2, "warmup_steps": 2, "log_every": 1, "save_every": 5, "keep_last": 2,
                     "progress": False, "tensorboard": False, **train}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss/total from metrics.jsonl (a later line for the same step wins)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss/total" in rec:
            out[rec["step"]] = rec["loss/total"]
    return out

KILL_IN_SAVE_ENV = "TOY_KILL_IN_SAVE_AT_STEP"


def kill_during_save(step: int) -> None:
    """Test fault: SIGKILL every rank of the save of `step` after it wrote its DeepSpeed shards and
    rank state, before the ranks hash and commit (patched into the save from outside)."""
    from megavla.train import checkpoint as ckpt
    write = ckpt.write_rank_state

    def write_then_die(tmp, rank, rank_state):
        write(tmp, rank, rank_state)
        if tmp.name.endswith(f"step_{step:06d}"):
            os.kill(os.getpid(), signal.SIGKILL)
    ckpt.write_rank_state = write_then_die


if __name__ == "__main__":
    import argparse

    from megavla.train.entry import run, run_then_shutdown
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    if os.environ.get(KILL_IN_SAVE_ENV):
        kill_during_save(int(os.environ[KILL_IN_SAVE_ENV]))
    sys.exit(run_then_shutdown(lambda: run(load_config(args.config), resume=args.resume, overwrite=args.overwrite,
                                           model_factory=toy_model_factory, loader_factory=toy_loader_factory)))
