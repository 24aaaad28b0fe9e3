"""Reading checkpoint files without running code from them.

A ``.pt`` file is a pickle, and unpickling with ``weights_only=False`` calls whatever the file names:
a checkpoint from someone else could run code on our machine. Every ``.pt`` MegaVLA reads goes through
``torch.load(weights_only=True)``, which admits only tensors, plain containers and an allowlist of
globals. DeepSpeed's own state files need three of its classes beyond torch's defaults (measured on
ZeRO-0/1/2/3 checkpoints, fp32 and bf16, 1 and 2 ranks, and their ds_to_universal conversions with
``torch.serialization.get_unsafe_globals_in_checkpoint``); they are plain data holders:

- ``deepspeed.runtime.fp16.loss_scaler.LossScaler``  (the optimizer's loss-scale state),
- ``deepspeed.runtime.zero.config.ZeroStageEnum``     (an int Enum: the ZeRO stage),
- ``deepspeed.utils.tensor_fragment.fragment_address`` (a dataclass of two ints).

DeepSpeed itself loads its files with ``weights_only=False`` (its checkpoint engine, the ZeRO
optimizers' universal-checkpoint loading, ``zero_to_fp32``, ``ds_to_universal``), and not all of
those go through the pluggable checkpoint engine; so :func:`deepspeed_loads_are_safe` replaces
``torch.load`` for the duration of a DeepSpeed call with one that forces ``weights_only=True`` (and
sets torch's own ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` for any direct ``torch.serialization.load``).
A file that does not load that way is refused with :class:`UnsafeCheckpointError`, which names it.

``python -m megavla.train.safe_load --input_folder IN --output_folder OUT ...`` runs DeepSpeed's
``ds_to_universal`` converter under the same rule (the trainer runs it as a subprocess).
"""
from __future__ import annotations

import contextlib
import functools
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import ResumeError

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
UNSAFE_EXIT = 3   # the converter's exit code for a refused file (its last stderr line names it)
FIX = ("Load only checkpoints that you or someone you trust trained; for weights from elsewhere ask for "
       "an export (`megavla export`: model.safetensors, which cannot hold code)")


# torch.load as torch defines it (deepspeed_loads_are_safe swaps the module attribute for a while).
_ORIGINAL_LOAD = torch.load


class UnsafeCheckpointError(ResumeError, ValueError):
    """A checkpoint file that ``torch.load(weights_only=True)`` refuses. A ResumeError for the trainer
    (one line, every rank), a ValueError for export / eval / serve (their CLIs report those)."""


@functools.cache
def deepspeed_globals() -> tuple:
    """The classes DeepSpeed pickles into its state files (see the module docstring)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return LossScaler, ZeroStageEnum, fragment_address


def refusal(path: Any, error: BaseException) -> UnsafeCheckpointError:
    text = str(error)
    found = re.search(r"Unsupported (global|operand)[^\n]*?(?= was not|\. |\n|$)", text)
    if found:
        return UnsafeCheckpointError(
            f"{path}: refused to load: it holds pickled objects beyond tensors and DeepSpeed's checkpoint "
            f"state ({found.group(0)}): loading it could run code. {FIX}")
    reason = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    reason_text = (reason.group(1) if reason else text.splitlines()[0] if text else type(error).__name__)[:200]
    return UnsafeCheckpointError(f"{path}: refused to load: not a readable checkpoint file ({reason_text}); "
                                 "restore it from its source, or pass another checkpoint")


def load_pt(path: str | Path, *, deepspeed_state: bool = False, mmap: bool = False,
            map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; ``deepspeed_state`` admits DeepSpeed's three classes.
    Raises UnsafeCheckpointError naming the file when it holds anything else."""
    allowed = list(deepspeed_globals()) if deepspeed_state else []
    try:
        with torch.serialization.safe_globals(allowed):
            return _ORIGINAL_LOAD(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise refusal(path, e) from None
    except RuntimeError as e:
        if mmap and "mmap can only be used" in str(e):     # a legacy (non-zip) torch.save file
            return load_pt(path, deepspeed_state=deepspeed_state, map_location=map_location)
        raise refusal(path, e) from None                   # e.g. not a zip archive: damaged


def check_files(*dirs: Path) -> int:
    """Refuse (UnsafeCheckpointError) the first ``.pt`` under ``dirs`` that holds more than tensors
    and DeepSpeed's state, before anything is built from them. Tensors are memory-mapped, not read,
    so this costs about one pass over the pickles. Returns the number of files checked."""
    count = 0
    for root in dirs:
        if not root.is_dir():
            continue
        for f in sorted(root.rglob("*.pt")):
            load_pt(f, deepspeed_state=True, mmap=True)
            count += 1
    return count


def _weights_only_load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None,
                       **pickle_load_args):
    # pickle_module is dropped: weights_only loads use torch's own restricted unpickler.
    try:
        with torch.serialization.safe_globals(list(deepspeed_globals())):
            return _ORIGINAL_LOAD(f, map_location=map_location, weights_only=True, mmap=mmap, **pickle_load_args)
    except pickle.UnpicklingError as e:
        raise refusal(f, e) from None


@contextlib.contextmanager
def deepspeed_loads_are_safe() -> Iterator[None]:
    """Within the block, DeepSpeed's ``torch.load(..., weights_only=False)`` calls load with
    ``weights_only=True`` and DeepSpeed's allowlist (not thread-safe: the trainer, export and the
    converter call DeepSpeed's loaders from one thread)."""
    deepspeed_globals()
    saved_env = os.environ.get(FORCE_ENV)
    torch.load = _weights_only_load
    os.environ[FORCE_ENV] = "1"
    try:
        yield
    finally:
        torch.load = _ORIGINAL_LOAD
        if saved_env is None:
            os.environ.pop(FORCE_ENV, None)
        else:
            os.environ[FORCE_ENV] = saved_env


def universal_converter_command(input_folder: Path, output_folder: Path) -> list[str]:
    """The subprocess that converts a ZeRO checkpoint for another world size, loads made safe."""
    return [sys.executable, "-m", "megavla.train.safe_load", "--input_folder", str(input_folder),
            "--output_folder", str(output_folder), "--num_extract_workers", "1", "--num_merge_workers", "1"]


def _convert_main() -> int:
    # One worker each: ds_to_universal then runs in this process, where the safe load is in place.
    from deepspeed.checkpoint import ds_to_universal
    args = ds_to_universal.parse_arguments()
    try:
        with deepspeed_loads_are_safe():
            ds_to_universal.main(args)
    except UnsafeCheckpointError as e:
        sys.stderr.write(f"{e}\n")
        return UNSAFE_EXIT
    return 0


if __name__ == "__main__":
    raise SystemExit(_convert_main())
