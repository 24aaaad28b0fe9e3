"""`train.init_from`: a fresh run's initial weights from a MegaVLA run, checkpoint or export.

A finetune is an ordinary training run with `train.init_from=<pretraining run or checkpoint>`: the
model is built, these weights are loaded into it (strict: every tensor, nothing left over), and the
run then trains with its own optimizer, schedule and step count from 0. A resume restores the
run's own checkpoint instead, so this load happens on a fresh start only.

Which weights: those evaluation and serving load from the same path (eval.policy: a run dir means
its newest loadable checkpoint; its EMA weights when it kept them, else the raw ones), so a
finetune starts from the model that was measured.

Run dirs made before the field existed carry an ``init_from.json`` ({"checkpoint": DIR or null})
beside their config.yaml instead; `from_legacy_file` reads it (megavla.eval.finetune, the
``launch.entry`` those runs name, and the experiment driver, which moves it into the config).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from megavla.config import ConfigError

log = logging.getLogger(__name__)

LEGACY_FILE = "init_from.json"


def load_init_weights(model: torch.nn.Module, init_from: str) -> None:
    """Load `init_from`'s weights into the freshly built `model` (strict)."""
    from megavla.eval.policy import choose_weights, load_state_dict, resolve_checkpoint_dir
    ckpt = resolve_checkpoint_dir(init_from)
    model.load_state_dict(load_state_dict(ckpt), strict=True)   # its EMA when it kept one
    log.info("train.init_from: initial weights from %s (%s)", ckpt, choose_weights(ckpt))


def from_legacy_file(run_dir: str | Path) -> str | None:
    """The checkpoint an ``init_from.json`` in `run_dir` names ("" for null: random initial weights),
    or None when the run dir has no such file."""
    path = Path(run_dir) / LEGACY_FILE
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); expected {{\"checkpoint\": DIR or null}}, or delete "
                          "it and set train.init_from in the run's config") from None
    if not isinstance(spec, dict) or "checkpoint" not in spec:
        raise ConfigError(f"{path}: no 'checkpoint' key; expected {{\"checkpoint\": DIR or null}}, or delete it "
                          "and set train.init_from in the run's config")
    return "" if spec["checkpoint"] is None else str(spec["checkpoint"])
