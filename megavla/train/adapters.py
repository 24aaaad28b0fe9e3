"""train.lora in a training run: adapters applied after the pretrained load with the rest frozen
(megavla/model/lora.py), and the resume check that a checkpoint's adapters are the ones configured."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from megavla.config import to_dict

from .errors import ResumeError, TrainingError

log = logging.getLogger("megavla.train.entry")


def apply_lora_for_training(model: torch.nn.Module, cfg) -> None:
    """train.lora: adapters on the chosen layers, then everything but them and train.trainable_parts
    frozen (no gradient, no optimizer state). A TrainingError (every rank) when they match nothing."""
    from megavla.model.lora import apply_lora, freeze_for_lora
    try:
        apply_lora(model, cfg.train.lora)
        trainable, frozen = freeze_for_lora(model, cfg.train.trainable_parts)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    log.info("LoRA: %.3fM trainable parameters (adapters + trainable_parts %s), %.2fM frozen",
             trainable / 1e6, cfg.train.trainable_parts or "none", frozen / 1e6)


def check_same_adapters(saved: dict, path: Path, cfg) -> None:
    """A checkpoint holds the adapters (and trainable set) its run was built with; a resume with other
    LoRA settings would not load or would train other parameters. A ResumeError naming both."""
    def key(train: dict) -> dict:
        lora = {"rank": 0, **(train.get("lora") or {})}
        rank = lora["rank"] or 0
        return {"rank": rank, "alpha": (lora.get("alpha") or rank) if rank else None,
                "targets": lora.get("targets") if rank else None, "parts": lora.get("parts") if rank else None,
                "trainable_parts": list(train.get("trainable_parts") or [])}
    old, new = key(saved["config"]["train"]), key(to_dict(cfg.train))
    if old != new:
        raise ResumeError(f"{path} was trained with train.lora / trainable_parts {old}, this config has {new}: "
                          "resume with the checkpoint's settings, or start a new run (another train.run_dir)")


def _frozen_values(path: Path, names: set[str]) -> dict[str, torch.Tensor]:
    """Full values of the parameters `names` from checkpoint `path`'s DeepSpeed model-states files:
    ZeRO-0/1/2 keep whole tensors in mp_rank_00's `module` (read memory-mapped); ZeRO-3 keeps each
    rank's flat partition in `frozen_param_fragments`, joined here in rank order."""
    from .safe_load import load_pt
    single = path / "mp_rank_00_model_states.pt"
    if single.is_file():
        module = load_pt(single, deepspeed_state=True, mmap=True).get("module") or {}
        return {n: module[n] for n in names if n in module and module[n].numel()}
    parts = sorted(path.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"),
                   key=lambda f: int(f.name.split("_")[3]))
    fragments: dict[str, list[torch.Tensor]] = {}
    shapes: dict = {}
    for f in parts:
        state = load_pt(f, deepspeed_state=True)
        shapes.update(state.get("frozen_param_shapes") or {})
        for n, t in (state.get("frozen_param_fragments") or {}).items():
            if n in names:
                fragments.setdefault(n, []).append(t.flatten())
    out = {}
    for n, pieces in fragments.items():
        shape = torch.Size(shapes[n])
        out[n] = torch.cat(pieces)[:shape.numel()].view(shape)
    return out


def restore_frozen_parameters(module: torch.nn.Module, path: Path) -> int:
    """After a universal-checkpoint load (a resume at another world size / ZeRO stage): DeepSpeed's
    conversion carries only the parameters the optimizer holds, so frozen ones (a LoRA run's base
    weights, train.freeze) would keep this process's fresh build -- not the pretrained values, since a
    resume does not reload train.pretrained. They are read from the original checkpoint instead.
    Returns how many were restored; a ResumeError names those the checkpoint lacks."""
    frozen = [(n, p) for n, p in module.named_parameters() if not p.requires_grad]
    if not frozen:
        return 0
    values = _frozen_values(path, {n for n, _ in frozen})
    missing = [n for n, _ in frozen if n not in values]
    if missing:
        raise ResumeError(f"{path}: holds no values for {len(missing)} frozen parameters ({', '.join(missing[:4])}"
                          f"{', ...' if len(missing) > 4 else ''}); resume at the checkpoint's world size and ZeRO "
                          "stage, or start a new run")
    for name, p in frozen:
        if hasattr(p, "ds_id"):        # ZeRO-3: every rank gathers, rank 0's write is re-partitioned
            import deepspeed
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(values[name].to(p.dtype).view_as(p.data))
        else:
            with torch.no_grad():
                p.copy_(values[name].to(p.dtype))
    log.info("restored %d frozen parameters from %s (not in the universal checkpoint)", len(frozen), path)
    return len(frozen)
