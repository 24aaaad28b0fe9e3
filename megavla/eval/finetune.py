"""``launch.entry=megavla.eval.finetune:run``: the entry of finetune run dirs made before the config
had ``train.init_from``.

A finetune is now an ordinary training run with ``train.init_from=<run or checkpoint dir>`` (the
experiment driver sets it; megavla/train/warm_start.py loads it). Run dirs the driver made before
name this entry in their config.yaml and carry the initial checkpoint in an ``init_from.json``
beside it (``{"checkpoint": DIR or null}``): this entry moves that value into ``train.init_from`` and
runs the normal trainer, so such a run (a SLURM requeue included) trains exactly as it did.
"""
from __future__ import annotations

import logging

from pathlib import Path

from megavla.config import Config, ConfigError, load_config, write_yaml
from megavla.train.stop import EXIT_SIGNAL_SAVED  # noqa: F401  (the launcher reads it from here)
from megavla.train.warm_start import LEGACY_FILE, from_legacy_file

log = logging.getLogger(__name__)


def with_legacy_init(cfg: Config) -> Config:
    """`cfg` with the run dir's ``init_from.json`` (if any) as ``train.init_from``; a file that names
    another checkpoint than a ``train.init_from`` already set is an error."""
    legacy = from_legacy_file(cfg.train.require_run_dir())
    if legacy is None:
        return cfg
    if cfg.train.init_from and cfg.train.init_from != legacy:
        raise ConfigError(f"{cfg.train.run_dir}/{LEGACY_FILE} names {legacy!r} but train.init_from="
                          f"{cfg.train.init_from!r}; keep one (delete the file, or unset train.init_from)")
    cfg.train.init_from = legacy
    cfg.train.validate()      # the directory it names must still be there
    return cfg


def adopt_legacy_init(run_dir: str | Path, steps: int) -> None:
    """A run dir made before ``train.init_from`` (its config.yaml names launch.entry=
    megavla.eval.finetune:run and an ``init_from.json`` holds the checkpoint) that the sweep will
    start or resume: write that checkpoint into its config.yaml as ``train.init_from``, so the sweep
    sees the config it would make today and resumes the run instead of refusing a changed config.
    Finished, queued and running runs are left as they are (the sweep skips them; a queued job's
    entry reads the file itself). The file stays: reports copy it, and `run` agrees with it."""
    from megavla.launch import rundir
    config = Path(run_dir) / "config.yaml"
    legacy = from_legacy_file(run_dir)
    if legacy is None or not config.is_file() or rundir.run_state(run_dir, steps) in ("finished", "queued", "running"):
        return
    cfg = load_config(config)
    if cfg.train.init_from == legacy:
        return
    if cfg.train.init_from:
        raise ConfigError(f"{run_dir}: {LEGACY_FILE} names {legacy!r}, its config.yaml train.init_from="
                          f"{cfg.train.init_from!r}; delete one of them")
    cfg.train.init_from = legacy
    write_yaml(cfg, config)
    log.info("%s: %s (%s) moved into config.yaml as train.init_from", run_dir, LEGACY_FILE, legacy or "null")


def run(cfg: Config, resume: str | None = None) -> int:
    from megavla.train.entry import run as train_run
    return train_run(with_legacy_init(cfg), resume)
