"""``launch.entry`` for finetuning runs: the trainer's ``run`` with the model initialised from a
pretrained checkpoint.

The config tree has no "initialise weights from a MegaVLA run" field (`train.pretrained` takes a
PaliGemma checkpoint; the trainer's resume restores a run's own checkpoints, optimizer included), so the experiment driver writes ``init_from.json`` into each
finetune run directory before the sweep submits it: ``{"checkpoint": "<run or checkpoint dir>"}``
or ``{"checkpoint": null}`` (train from scratch: the 0 % diversity row). The file travels with the
run dir, so a SLURM requeue finds it too. When the run resumes from its own checkpoint, DeepSpeed's
load replaces these initial weights, as it should.

Use: ``launch.entry=megavla.eval.finetune:run`` (the sweep's overrides do this).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from megavla.config import Config
from megavla.train.trainer import EXIT_SIGNAL_SAVED  # noqa: F401  (the launcher reads it from here)

log = logging.getLogger(__name__)

INIT_FILE = "init_from.json"


def write_init(run_dir: str | Path, checkpoint: str | Path | None) -> Path:
    path = Path(run_dir) / INIT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"checkpoint": None if checkpoint is None else str(checkpoint)}))
    return path


def read_init(run_dir: str | Path) -> str | None:
    path = Path(run_dir) / INIT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a run with launch.entry=megavla.eval.finetune:run "
                                "needs it ({\"checkpoint\": DIR or null}); `megavla experiment` writes it")
    spec = json.loads(path.read_text())
    if "checkpoint" not in spec:
        raise ValueError(f"{path}: no 'checkpoint' key; expected {{\"checkpoint\": DIR or null}}")
    return spec["checkpoint"]


def run(cfg: Config, resume: str | None = None) -> int:
    from megavla.model.vla import build_model
    from megavla.train.entry import run as train_run

    from .policy import choose_weights, load_state_dict, resolve_checkpoint_dir

    init = read_init(cfg.train.run_dir)

    def model_factory(c: Config):
        model = build_model(c.model)
        if init is not None:
            ckpt = resolve_checkpoint_dir(init)
            model.load_state_dict(load_state_dict(ckpt), strict=True)  # its EMA when it kept one
            log.info("finetune: initial weights from %s (%s)", ckpt, choose_weights(ckpt))
        else:
            log.info("finetune: no pretrained checkpoint (init_from null): random initial weights")
        return model

    return train_run(cfg, resume, model_factory=model_factory)
