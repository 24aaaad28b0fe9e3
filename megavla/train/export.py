"""`megavla export CKPT --out DIR [--ema]`: one safetensors file + config for inference.

CKPT is a checkpoint directory (`.../checkpoints/step_000300`), a checkpoints directory or a run
directory (their newest complete checkpoint). The ZeRO shards (any stage, any world size) are
consolidated to fp32 with DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint`; the result is
loaded strictly into a freshly built model (so a mismatch fails here, not at inference) and written
with `megavla.model.io.save_model`: DIR/model.safetensors + DIR/model_config.yaml, plus the run's
resolved config.yaml, norm_stats.json and tokenizers/ copied from the checkpoint.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import torch

from megavla.config import Config, ConfigError, build, write_yaml

from . import checkpoint as ckpt

log = logging.getLogger(__name__)


def find_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if ckpt.is_complete(path):
        return path
    for candidate in (path, path / "checkpoints"):
        found = ckpt.list_checkpoints(candidate)
        if found:
            return found[-1]
    raise FileNotFoundError(f"{path}: not a checkpoint (needs {ckpt.STATE_FILE}) and holds no complete "
                            "checkpoint; pass e.g. runs/demo/run/checkpoints/step_000300")


def _module_states(path: Path) -> dict[str, torch.Tensor]:
    """Rank 0's `module` entry of DeepSpeed's model-states file (its own format, not ours)."""
    files = sorted(path.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{path}: no mp_rank_*_model_states.pt (not a DeepSpeed checkpoint?)")
    return torch.load(files[0], map_location="cpu", weights_only=False)["module"] or {}


def consolidated_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """fp32 model weights of checkpoint `path`, gathered from every rank's shards."""
    state = ckpt.read_trainer_state(path)
    if state["zero_stage"] > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        weights = dict(get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name))
        if state["zero_stage"] == 1:
            # ZeRO-1 records frozen parameters (e.g. a frozen vision tower) only in the module
            # states, not in the optimizer shards that zero_to_fp32 reads.
            for name, tensor in _module_states(path).items():
                weights.setdefault(name, tensor)
    else:
        weights = _module_states(path)    # ZeRO-0: the full module is in rank 0's file
    return {k: v.float().contiguous() for k, v in weights.items()}


def export(path: str | Path, out: str | Path, use_ema: bool = False) -> Path:
    from megavla.model.io import save_model
    from megavla.model.vla import build_model

    path = find_checkpoint(path)
    out = Path(out)
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
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint weights do not match the model config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    weights_path = save_model(model, out)
    write_yaml(cfg, out / "config.yaml")
    for name in ("norm_stats.json", "tokenizers"):
        src = path / name
        if src.is_dir():
            shutil.copytree(src, out / name, dirs_exist_ok=True)
        elif src.is_file():
            shutil.copy2(src, out / name)
    log.info("exported %s (step %d) -> %s", path, state["step"], weights_path)
    return weights_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megavla export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint dir, checkpoints dir or run dir")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw ones")
    args = parser.parse_args(argv)
    try:
        weights = export(args.checkpoint, args.out, use_ema=args.ema)
    except (FileNotFoundError, ConfigError, ValueError) as e:
        sys.stderr.write(f"megavla export: {e}\n")
        return 2
    print(f"wrote {weights}")
    return 0
