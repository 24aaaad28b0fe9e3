"""Atomic, sharded checkpoints: DeepSpeed's per-rank shards + our trainer state as JSON/safetensors.

Layout (one checkpoint = one directory under ``<run_dir>/checkpoints``)::

    step_000120/   mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt  (DeepSpeed's)
                   rank_00000.json ...  per rank: RNG states + data-loader state
                   ema.safetensors      optional EMA weights (fp32)
                   norm_stats.json, tokenizers/   copied from the run dir (inference needs them)
                   manifest.json        size + sha256 of every file above (checked before a resume)
                   trainer_state.json   step, world size, batch layout, resolved config, code version
    latest         text file naming the newest complete checkpoint

Atomicity: every rank writes into ``.tmp-step_000120``; after a barrier the ranks hash the files
(each a slice), rank 0 writes manifest.json and trainer_state.json, renames the directory to
``step_000120`` (the commit point) and only then replaces ``latest``. A process killed anywhere
before the rename leaves a ``.tmp-*`` directory that is ignored and removed by the next save, so the
previous checkpoint stays the resume point. What to resume from is decided in `resume.py`.
"""
from __future__ import annotations

import base64
import json
import logging
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from megavla.fileio import atomic_write_json, atomic_write_text

from .errors import CheckpointError
from .safe_load import UNSAFE_EXIT, UnsafeCheckpointError, universal_converter_command
from .resume import (MANIFEST_FILE, MANIFEST_FORMAT, STATE_FILE, TAG_RE, committed_checkpoints,  # noqa: F401
                     file_digests, files_under, step_of, tag_for)

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
# Free space asked for beyond the previous checkpoint's size before a save starts.
SPACE_MARGIN = 1.05


def _barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any (a collective every rank reaches): how the ranks
    agree to give up a save, or to refuse one, together."""
    t = torch.tensor([int(flag)], device=device)
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


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
    """Committed checkpoints with a trainer_state.json, oldest first (not checked for damage)."""
    return [p for p in committed_checkpoints(ckpt_dir) if (p / STATE_FILE).is_file()]


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def rank_state_file(path: Path, rank: int) -> Path:
    """A rank's RNG + loader state in checkpoint `path` (train_state.TrainState reads it)."""
    return path / f"rank_{rank:05d}.json"


# ---- saving -------------------------------------------------------------------------------------
def write_rank_state(tmp: Path, rank: int, rank_state: dict) -> None:
    """Each rank's RNG + loader state; the last file a rank writes before the ranks hash the files."""
    rank_state_file(tmp, rank).write_text(json.dumps(rank_state))


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def needed_bytes(ckpt_dir: Path) -> int | None:
    """Size of the newest committed checkpoint: what the next save will need again (None: first save)."""
    done = list_checkpoints(ckpt_dir)
    if not done:
        return None
    return sum(f.stat().st_size for f in done[-1].rglob("*") if f.is_file())


def _space_problem(ckpt_dir: Path) -> str | None:
    need = needed_bytes(ckpt_dir)
    free = shutil.disk_usage(ckpt_dir).free
    if need is not None and free < need * SPACE_MARGIN:
        return (f"not enough free space in {ckpt_dir}: the last checkpoint took {_mb(need)}, "
                f"{_mb(free)} are free")
    return None


def _save_failure(tag: str, ckpt_dir: Path, error: BaseException | str) -> CheckpointError:
    free = shutil.disk_usage(ckpt_dir).free
    need = needed_bytes(ckpt_dir)
    need_text = f"the last checkpoint took {_mb(need)}" if need else "no earlier checkpoint to size it by"
    cause = str(error)
    if "iostream error" in cause or "No space" in cause or getattr(error, "errno", None) == 28:
        cause += " (a full disk: No space left on device)"
    return CheckpointError(
        f"saving checkpoint {tag} in {ckpt_dir} failed: {cause}; {need_text}, {_mb(free)} free now. "
        f"Earlier checkpoints are intact: free space (or lower train.keep_last), then --resume auto")


def save_checkpoint(engine, ckpt_dir: Path, step: int, *, rank: int, device: torch.device, trainer_state: dict,
                    rank_state: dict, ema_state: dict[str, torch.Tensor] | None = None,
                    extra_paths: dict[str, Path] | None = None, keep_last: int = 3) -> Path:
    """Collective: every rank calls it at the same step. Returns the committed directory; raises
    CheckpointError on every rank (and removes the partial save) if any rank could not write."""
    from .metrics import allgather_json
    tag = tag_for(step)
    tmp_tag = TMP_PREFIX + tag
    final, tmp = ckpt_dir / tag, ckpt_dir / tmp_tag
    problem = None
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(TMP_PREFIX + "*"):      # left by a save that was killed
            log.warning("removing incomplete checkpoint %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        problem = _space_problem(ckpt_dir)
    if any_rank(problem is not None, device):
        raise _save_failure(tag, ckpt_dir, problem or "rank 0 found too little free space")
    error: BaseException | None = None
    try:
        # universal_checkpoint_info (empty: no tensor/pipeline parallel patterns) is what ds_to_universal
        # requires to convert this checkpoint for another world size.
        engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, save_latest=False,
                               client_state={"universal_checkpoint_info": {}})
        write_rank_state(tmp, rank, rank_state)
        if rank == 0:
            if ema_state is not None:
                from safetensors.torch import save_file
                save_file({k: v.contiguous() for k, v in ema_state.items()}, str(tmp / "ema.safetensors"))
            for name, src in (extra_paths or {}).items():
                if src.is_dir():
                    shutil.copytree(src, tmp / name)
                elif src.is_file():
                    shutil.copy2(src, tmp / name)
    except (OSError, RuntimeError) as e:     # torch's writer reports ENOSPC as "basic_ios::clear"
        error = e
    if any_rank(error is not None, device):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _save_failure(tag, ckpt_dir, error or "another rank could not write its shard")
    # Every rank hashes a slice of the files (the shards are about equal), rank 0 writes the manifest.
    world = tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1
    names = files_under(tmp)
    digests: dict[str, dict] = {}
    for part in allgather_json(file_digests(tmp, names[rank::world]), device):
        digests.update(part)
    if rank == 0:
        atomic_write_json(tmp / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "files": digests})
        atomic_write_json(tmp / STATE_FILE, trainer_state)
        replaced = None
        if final.exists():      # re-saving a step (e.g. after a resume): keep the old one until the swap
            replaced = final.with_name(TMP_PREFIX + "old-" + tag)
            final.replace(replaced)
        tmp.replace(final)                                  # the commit point
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        atomic_write_text(ckpt_dir / "latest", tag)         # moves last
        prune(ckpt_dir, keep_last)
    _barrier()
    return final


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
        # DeepSpeed's ds_to_universal, its torch.load calls held to weights_only=True (safe_load.py).
        proc = subprocess.run(universal_converter_command(path, tmp), capture_output=True, text=True)
        if proc.returncode == UNSAFE_EXIT:
            raise UnsafeCheckpointError(proc.stderr.strip().splitlines()[-1])
        if proc.returncode != 0:
            raise RuntimeError(f"ds_to_universal failed on {path}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        (tmp.parent / "latest_universal").unlink(missing_ok=True)
        tmp.replace(out)
    _barrier()
    return out
