"""`megavla export CKPT --out DIR [--ema] [--overwrite]`: one safetensors file + config for inference.

CKPT is a checkpoint directory (`.../checkpoints/step_000300`), a checkpoints directory or a run
directory: which checkpoint is decided by the rule resume, eval and serve share
(`resume.checkpoint_for`: the newest loadable by step). The ZeRO shards (any stage, any world size)
are consolidated to fp32 with DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint`, its file
reads held to `torch.load(weights_only=True)` (safe_load.py: a file that could run code is refused,
named); the result is loaded strictly into a freshly built model (so a mismatch fails here, not at
inference) and written with `megavla.model.io.save_model`: DIR/model.safetensors +
DIR/model_config.yaml (LoRA adapters, train.lora, are merged into their weights first, so the
export is a plain model), plus the run's resolved config.yaml, norm_stats.json and tokenizers/ copied
from the checkpoint, and export.json (the step, the source checkpoint, which weights).
A DIR that already holds files is refused unless --overwrite (as every MegaVLA writer does); the
export is written beside DIR first and moved in only when complete.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import torch

from megavla.config import Config, ConfigError, build, write_yaml
from megavla.eval.policy import EXPORT_RECORD
from megavla.fileio import atomic_write_json
from megavla.model.io import CONFIG_FILE, WEIGHTS_FILE

from . import checkpoint as ckpt
from .resume import checkpoint_for
from .safe_load import deepspeed_loads_are_safe, load_pt

log = logging.getLogger(__name__)

# What an export writes into --out (and what --overwrite replaces).
EXPORT_FILES = (WEIGHTS_FILE, CONFIG_FILE, "config.yaml", "norm_stats.json", "tokenizers", EXPORT_RECORD)


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint `path` means, by the rule resume, eval and serve share (resume.checkpoint_for):
    a run or checkpoints dir -> its newest loadable checkpoint; damaged newer ones are skipped with a
    warning. Raises NoLoadableCheckpoint (a ValueError) naming what is damaged or missing."""
    found, skipped = checkpoint_for(path)
    for problem in skipped:
        log.warning("damaged checkpoint skipped: %s", problem)
    return found


def _module_states(path: Path) -> dict[str, torch.Tensor]:
    """Rank 0's `module` entry of DeepSpeed's model-states file (its own format, not ours), read
    with weights_only=True (safe_load: a file that holds more than tensors and DeepSpeed's state is
    refused, never unpickled)."""
    files = sorted(path.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{path}: no mp_rank_*_model_states.pt (not a DeepSpeed checkpoint?)")
    return load_pt(files[0], deepspeed_state=True)["module"] or {}


def consolidated_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """fp32 model weights of checkpoint `path`, gathered from every rank's shards."""
    state = ckpt.read_trainer_state(path)
    if state["zero_stage"] > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with deepspeed_loads_are_safe():     # zero_to_fp32 unpickles with weights_only=False
            weights = dict(get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name))
        if state["zero_stage"] == 1:
            # ZeRO-1 records frozen parameters (e.g. a frozen vision tower) only in the module
            # states, not in the optimizer shards that zero_to_fp32 reads.
            for name, tensor in _module_states(path).items():
                weights.setdefault(name, tensor)
    else:
        weights = _module_states(path)    # ZeRO-0: the full module is in rank 0's file
    return {k: v.float().contiguous() for k, v in weights.items()}


def check_output(out: Path, overwrite: bool) -> None:
    """The rule every writer follows: an existing non-empty output is refused unless --overwrite."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory; choose another --out")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        what = "an export" if WEIGHTS_FILE in held else "files"
        raise FileExistsError(f"{out}: already holds {what} ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}); "
                              "choose another directory or pass overwrite (--overwrite)")


def _publish(tmp: Path, out: Path) -> None:
    """Move a finished export from `tmp` into `out`, replacing what an earlier export wrote there
    (so no file of another model is left beside the new weights); other files are kept."""
    out.mkdir(parents=True, exist_ok=True)
    replaced = [name for name in EXPORT_FILES if (out / name).exists()]
    for name in replaced:
        old = out / name
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    if replaced:
        log.info("--overwrite: replaced %s in %s", ", ".join(replaced), out)
    kept = sorted(p.name for p in out.iterdir())
    if kept:
        log.info("--overwrite: kept %d file(s) the export does not write: %s", len(kept), ", ".join(kept[:8]))
    for item in tmp.iterdir():
        item.replace(out / item.name)
    tmp.rmdir()


def export(path: str | Path, out: str | Path, use_ema: bool = False, overwrite: bool = False) -> Path:
    """Write the export of the checkpoint `path` means into `out` (refused if `out` holds files,
    unless `overwrite`); returns the weights file. Nothing appears in `out` unless all of it is written."""
    from megavla.model.io import save_model
    from megavla.model.vla import build_model

    out = Path(out).resolve()
    check_output(out, overwrite)
    path = find_checkpoint(path)
    state = ckpt.read_trainer_state(path)
    try:
        cfg = build(Config, state["config"])
    except ConfigError as e:
        raise ConfigError(f"{path / ckpt.STATE_FILE}: saved config does not load with this code: {e}") from None
    weights = consolidated_state_dict(path)
    if use_ema:
        ema_file = path / "ema.safetensors"
        if not ema_file.is_file():
            raise FileNotFoundError(f"--ema: {ema_file} does not exist (train with train.ema_decay set)")
        from safetensors.torch import load_file
        weights.update(load_file(str(ema_file)))
    model = build_model(cfg.model)
    if cfg.train.lora.enabled:      # the checkpoint holds adapters: build them, load, then merge
        from megavla.model.lora import apply_lora
        apply_lora(model, cfg.train.lora)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint weights do not match the model config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if cfg.train.lora.enabled:
        from megavla.model.lora import merge_lora
        # plain weights W + (alpha / r) B A: the export loads into a model built without LoRA
        log.info("merged LoRA adapters of %d layers into their weights", merge_lora(model))
    tmp = out.with_name(f".tmp-{out.name}")       # beside `out`: the final moves are renames
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_model(model, tmp)
        write_yaml(cfg, tmp / "config.yaml")
        for name in ("norm_stats.json", "tokenizers"):
            src = path / name
            if src.is_dir():
                shutil.copytree(src, tmp / name)
            elif src.is_file():
                shutil.copy2(src, tmp / name)
        # The export's own record: inference reports this step (eval.policy reads it).
        atomic_write_json(tmp / EXPORT_RECORD, {"step": int(state["step"]), "checkpoint": str(path),
                                                "weights": "ema" if use_ema else "raw"})
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    weights_path = out / WEIGHTS_FILE
    log.info("exported %s (step %d) -> %s", path, state["step"], weights_path)
    return weights_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megavla export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint dir, checkpoints dir or run dir")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw ones")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export in --out (refused by default if --out holds files)")
    args = parser.parse_args(argv)
    try:
        weights = export(args.checkpoint, args.out, use_ema=args.ema, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ConfigError, ValueError) as e:
        sys.stderr.write(f"megavla export: {e}\n")
        return 2
    print(f"wrote {weights}")
    return 0
