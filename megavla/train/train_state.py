"""The train state: what a checkpoint restores besides the weights and the optimizer (after lingua's
TrainState: one small object with `state_dict()` / `load_state_dict()`).

It is saved as two JSON files per checkpoint (checkpoint.py writes them; no pickle):
- ``trainer_state.json`` (rank 0): the step, the non-finite steps skipped so far, the batch layout,
  world size, ZeRO stage and precision it was trained with, the resolved config and code version,
  and save-time notes (reason, time) that export, evaluation and `megavla sweep status` read;
- ``rank_NNNNN.json`` (each rank): that rank's RNG states and data-loader state.
The learning rate is not saved: the schedule is a function of the step (optim.set_schedule_step).

The JSON keys are those written since format 1. Reading is version-tolerant: files from before a
key existed get its old meaning (`batch`: derived from the saved config; `skipped_nonfinite`: 0), and
a format newer than this code reads is refused with a message instead of being half-understood.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import rank_state_file, rng_state, set_rng_state
from .errors import ResumeError
from .resume import STATE_FILE

STATE_FORMAT = 1


def batch_layout(micro_batch: int, accum: int, world_size: int) -> dict:
    return {"micro_batch": micro_batch, "grad_accum": accum, "world_size": world_size,
            "global_batch_size": micro_batch * accum * world_size}


def batch_change(old: dict, new: dict) -> dict | None:
    """{key: [old, new]} for each part of the batch layout that differs, or None."""
    changed = {k: [old.get(k), v] for k, v in new.items() if old.get(k) != v}
    return changed or None


def _layout_from_config(config: dict, world_size: int) -> dict:
    """The batch layout of a checkpoint saved before trainer_state.json had `batch`: from its config."""
    from megavla.config.train import TrainConfig

    from .engine import grad_accum_steps
    micro = int(config["data"]["batch_size"])
    accum = grad_accum_steps(TrainConfig(**{k: v for k, v in config["train"].items()
                                            if k in ("grad_accum", "global_batch_size")}), micro, world_size)
    return batch_layout(micro, accum, world_size)


@dataclass
class TrainState:
    step: int = 0                    # optimizer steps taken
    skipped_nonfinite: int = 0       # updates skipped for a non-finite loss / gradient, whole run
    batch: dict = field(default_factory=dict)   # batch_layout(): micro batch, accumulation, world, global
    world_size: int = 1
    zero_stage: int = 0
    precision: str = "fp32"
    config: dict = field(default_factory=dict)  # the resolved config (megavla.config.to_dict)
    code_version: str = "unknown"
    # this rank's part (rank_NNNNN.json): None until captured at a save or read from a checkpoint
    rng: dict | None = None
    loader: dict | None = None

    # ---- trainer_state.json ------------------------------------------------------------------
    def state_dict(self, reason: str) -> dict:
        """The trainer_state.json object of a save made for `reason` (periodic, end, stopped, ...)."""
        return {"format": STATE_FORMAT, "step": self.step, "world_size": self.world_size, "reason": reason,
                "zero_stage": self.zero_stage, "precision": self.precision, "batch": self.batch,
                "skipped_nonfinite": self.skipped_nonfinite, "config": self.config,
                "code_version": self.code_version, "time": time.time()}

    def load_state_dict(self, saved: dict, source: Path | str = STATE_FILE) -> None:
        fmt = int(saved.get("format", 1))
        if fmt > STATE_FORMAT:
            raise ResumeError(f"{source}: train state format {fmt} was written by a newer MegaVLA (this one "
                              f"reads up to {STATE_FORMAT}); resume it with that version")
        self.step = int(saved["step"])
        self.world_size = int(saved["world_size"])
        self.zero_stage = int(saved["zero_stage"])
        self.precision = saved.get("precision", self.precision)
        self.config = saved.get("config") or {}
        self.batch = saved["batch"] if "batch" in saved else _layout_from_config(self.config, self.world_size)
        self.skipped_nonfinite = int(saved.get("skipped_nonfinite", 0))
        self.code_version = saved.get("code_version", "unknown")

    # ---- rank_NNNNN.json ---------------------------------------------------------------------
    def capture_rank(self, loader) -> None:
        """This rank's RNG states and loader position, now (at a save, between steps)."""
        self.rng = rng_state()
        self.loader = loader.state_dict() if hasattr(loader, "state_dict") else None

    def rank_state_dict(self, rank: int) -> dict:
        return {"rank": rank, "world_size": self.world_size, "rng": self.rng, "loader": self.loader}

    def load_rank_state_dict(self, saved: dict) -> None:
        self.rng, self.loader = saved["rng"], saved.get("loader")

    def restore_rng(self) -> None:
        set_rng_state(self.rng)

    # ---- a checkpoint ------------------------------------------------------------------------
    @classmethod
    def read(cls, path: Path, rank: int | None = None) -> "TrainState":
        """The state saved in checkpoint `path`; with `rank`, that rank's part too when the
        checkpoint has it (`has_rank_state` says whether it did)."""
        state = cls()
        state.load_state_dict(json.loads((path / STATE_FILE).read_text()), path / STATE_FILE)
        if rank is not None and rank_state_file(path, rank).is_file():
            state.load_rank_state_dict(json.loads(rank_state_file(path, rank).read_text()))
        return state

    @property
    def has_rank_state(self) -> bool:
        return self.rng is not None

    def layout_differs(self, world_size: int, zero_stage: int) -> bool:
        """Saved at another world size or ZeRO stage: the shards need DeepSpeed's universal format
        and the per-rank states (streams of the old ranks) do not carry over."""
        return self.world_size != world_size or self.zero_stage != zero_stage
