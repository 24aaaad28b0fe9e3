"""Atomic, sharded checkpoints: DeepSpeed's per-rank shards + our trainer state as JSON/safetensors.

Layout (one checkpoint = one directory under ``<run_dir>/checkpoints``)::

    step_000120/   mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt  (DeepSpeed's)
                   trainer_state.json   step, world size, resolved config, code version, ds config
                   rank_00000.json ...  per rank: RNG states + data-loader state
                   ema.safetensors      optional EMA weights (fp32)
                   norm_stats.json, tokenizers/   copied from the run dir (inference needs them)
    latest         text file naming the newest complete checkpoint

Atomicity: every rank writes into ``.tmp-step_000120``; after a barrier rank 0 writes
trainer_state.json, renames the directory to ``step_000120`` (the commit point) and only then
replaces ``latest`` (write to a temp file + os.replace). A process killed anywhere before the rename
leaves a ``.tmp-*`` directory that is ignored and removed by the next save, so the previous
checkpoint stays the resume point.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step_(\d{6,})$")
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"
# Test hook: SIGKILL this process after DeepSpeed wrote its shards for this step, before the commit.
KILL_IN_SAVE_ENV = "MEGAVLA_TEST_KILL_IN_SAVE_AT_STEP"


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def step_of(path: Path) -> int:
    m = TAG_RE.match(path.name)
    if not m:
        raise ValueError(f"{path} is not a checkpoint directory (expected a name like step_000120)")
    return int(m.group(1))


def _barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# ---- RNG states as JSON (no pickle) --------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))


# ---- finding checkpoints ------------------------------------------------------------------------
def is_complete(path: Path) -> bool:
    return path.is_dir() and TAG_RE.match(path.name) is not None and (path / STATE_FILE).is_file()


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if is_complete(p)), key=step_of)


def resolve_resume(resume: str | None, ckpt_dir: Path) -> Path | None:
    """`None` -> start fresh; "auto" -> newest complete checkpoint (or fresh if none); else a path
    to a checkpoint directory (or to a checkpoints dir, meaning its newest)."""
    if resume is None:
        return None
    if resume == "auto":
        latest = ckpt_dir / "latest"
        if latest.is_file():
            candidate = ckpt_dir / latest.read_text().strip()
            if is_complete(candidate):
                newest = list_checkpoints(ckpt_dir)
                # `latest` moves last, so a newer complete checkpoint can exist only if we died between
                # the rename and the pointer update: prefer the newest complete one.
                return newest[-1] if newest and step_of(newest[-1]) > step_of(candidate) else candidate
        found = list_checkpoints(ckpt_dir)
        return found[-1] if found else None
    path = Path(resume)
    if is_complete(path):
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint directory (needs {STATE_FILE}) "
                            f"and holds none; use --resume auto or a path like {ckpt_dir}/step_000100")


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def read_rank_state(path: Path, rank: int) -> dict | None:
    f = path / f"rank_{rank:05d}.json"
    return json.loads(f.read_text()) if f.is_file() else None


# ---- saving -------------------------------------------------------------------------------------
def save_checkpoint(engine, ckpt_dir: Path, step: int, *, rank: int, trainer_state: dict,
                    rank_state: dict, ema_state: dict[str, torch.Tensor] | None = None,
                    extra_paths: dict[str, Path] | None = None, keep_last: int = 3) -> Path:
    """Collective: every rank calls it at the same step. Returns the committed directory."""
    tag = tag_for(step)
    tmp_tag = TMP_PREFIX + tag
    final, tmp = ckpt_dir / tag, ckpt_dir / tmp_tag
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(TMP_PREFIX + "*"):      # left by a save that was killed
            log.warning("removing incomplete checkpoint %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    # universal_checkpoint_info (empty: no tensor/pipeline parallel patterns) is what ds_to_universal
    # requires to convert this checkpoint for another world size.
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, save_latest=False,
                           client_state={"universal_checkpoint_info": {}})
    (tmp / f"rank_{rank:05d}.json").write_text(json.dumps(rank_state))
    if os.environ.get(KILL_IN_SAVE_ENV) == str(step):
        log.warning("test hook %s: SIGKILL during the save of step %d", KILL_IN_SAVE_ENV, step)
        os.kill(os.getpid(), signal.SIGKILL)
    _barrier()
    if rank == 0:
        if ema_state is not None:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in ema_state.items()}, str(tmp / "ema.safetensors"))
        for name, src in (extra_paths or {}).items():
            if src.is_dir():
                shutil.copytree(src, tmp / name)
            elif src.is_file():
                shutil.copy2(src, tmp / name)
        write_json_atomic(tmp / STATE_FILE, trainer_state)
        replaced = None
        if final.exists():      # re-saving a step (e.g. after a resume): keep the old one until the swap
            replaced = final.with_name(TMP_PREFIX + "old-" + tag)
            os.replace(final, replaced)
        os.replace(tmp, final)                              # the commit point
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        write_json_atomic_text(ckpt_dir / "latest", tag)    # moves last
        prune(ckpt_dir, keep_last)
    _barrier()
    return final


def write_json_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prune(ckpt_dir: Path, keep_last: int) -> None:
    done = list_checkpoints(ckpt_dir)
    for old in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(ckpt_dir / ".universal" / old.name, ignore_errors=True)


# ---- loading at another world size --------------------------------------------------------------
def universal_dir(path: Path) -> Path:
    return path.parent / ".universal" / path.name


def convert_to_universal(path: Path, rank: int) -> Path:
    """DeepSpeed universal checkpoint (ds_to_universal) of `path`, made once by rank 0; cached
    beside the checkpoints. Lets a ZeRO checkpoint load at another data-parallel world size."""
    out = universal_dir(path)
    if rank == 0 and not (out / "zero").is_dir():
        tmp = out.with_name(TMP_PREFIX + out.name)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        log.info("converting %s to a universal checkpoint (world size changed)", path)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
               "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ds_to_universal failed on {path}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        (tmp.parent / "latest_universal").unlink(missing_ok=True)
        os.replace(tmp, out)
    _barrier()
    return out
