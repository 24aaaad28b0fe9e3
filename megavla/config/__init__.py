"""Config tree of a MegaVLA run. See core.py for the rules (YAML + dotted overrides, strict keys)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .core import ConfigError, apply_overrides, build, load, merge, read_yaml, to_dict, write_yaml
from .data import DataConfig
from .launch import LaunchConfig
from .model import ModelConfig
from .train import TrainConfig


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


def follow_model_image_size(mapping: dict) -> dict:
    """``data.image_size`` left out of a run config's mapping = the model's image size (its preset's
    unless ``model.image_size`` is set): the frames are resized to what the model reads, so the two
    cannot disagree unless both are given. Unchanged where it is given or the preset is unknown."""
    data, model = mapping.get("data") or {}, mapping.get("model") or {}
    if not isinstance(data, dict) or not isinstance(model, dict) or data.get("image_size") is not None:
        return mapping
    size, preset = model.get("image_size"), model.get("preset", ModelConfig.preset)
    if size is None and isinstance(preset, str):
        from megavla.model.presets import PRESETS   # imports torch: only when the mapping leaves it out
        size = PRESETS.get(preset, {}).get("image_size")
    if not isinstance(size, int) or isinstance(size, bool):
        return mapping   # not a size: build names the model key's error
    return merge(mapping, {"data": {"image_size": size}})


def config_from_mapping(mapping: dict, check: bool = True) -> Config:
    """The run config tree of a mapping (a YAML file's, overrides applied): data.image_size follows the
    model where left out (:func:`follow_model_image_size`), keys and values are checked (core.build),
    and a config that names shard sets is checked across sections (model vs data sizes,
    checks.check_loaded), so every entry point refuses a mismatch before it starts a process.
    ``check=False`` only where every config is checked later with all its problems listed together
    (a sweep's check_runs names each bad run)."""
    cfg = build(Config, follow_model_image_size(mapping))
    if check:
        from .checks import check_loaded
        check_loaded(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                cls: type = Config, check: bool = True):
    """Read a YAML file (optional), apply dotted overrides, build and check the tree (a run config:
    :func:`config_from_mapping`; another dataclass ``cls``: core.load)."""
    if cls is not Config:
        return load(cls, path, overrides)
    return config_from_mapping(apply_overrides(read_yaml(path) if path else {}, list(overrides)), check)


__all__ = [
    "Config", "ConfigError", "DataConfig", "LaunchConfig", "ModelConfig",
    "TrainConfig", "build", "config_from_mapping", "load_config", "to_dict", "write_yaml",
]
