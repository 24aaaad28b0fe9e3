"""The config files that ship with MegaVLA: the repository's top-level ``configs/`` folder.

setup.py installs ``configs/`` as the package ``megavla.configs`` (as ``kernels/`` becomes
``megavla.kernels``), so a plain, non-editable ``pip install`` has every preset; they are found
through importlib.resources, never through a path relative to a source file (which points outside
site-packages there). An editable install made before ``configs/`` became package data has no
``megavla.configs`` in its import map: only there the checkout's ``configs/`` beside ``megavla/`` is
used (``pip install -e .`` again maps the package).
"""
from __future__ import annotations

import importlib.resources
import logging
from pathlib import Path

from .core import ConfigError

log = logging.getLogger(__name__)

PACKAGE = "megavla.configs"


def configs_dir() -> Path:
    """The directory of the shipped configs (demo.yaml, model/, train/, experiments/, sweeps/)."""
    try:
        root = importlib.resources.files(PACKAGE)
    except ModuleNotFoundError:
        import megavla
        checkout = Path(megavla.__file__).resolve().parents[1] / "configs"
        if (checkout / "__init__.py").is_file():
            log.debug("%s is not importable (an editable install older than the package data); using %s",
                      PACKAGE, checkout)
            return checkout
        raise ConfigError(f"the shipped configs ({PACKAGE}) are not installed; reinstall MegaVLA "
                          "(pip install .) from a checkout that has configs/") from None
    return Path(str(root))   # a regular package on the file system: a real directory


def shipped_config(relative: str) -> Path:
    """One shipped file, e.g. ``demo.yaml``; a ConfigError naming it when it is missing."""
    path = configs_dir() / relative
    if not path.is_file():
        raise ConfigError(f"{relative}: no such shipped config in {configs_dir()}")
    return path


def preset_names(kind: str) -> list[str]:
    """Names of the presets of one kind (the ``*.yaml`` stems in ``configs/<kind>/``; ``_``-prefixed
    files are fragments, not presets)."""
    return sorted(p.stem for p in (configs_dir() / kind).glob("*.yaml") if not p.stem.startswith("_"))


def resolve_preset(kind: str, preset: str | Path) -> Path:
    """A YAML path as given, else the shipped preset ``configs/<kind>/<preset>.yaml``; a ConfigError
    naming the presets of that kind when neither exists."""
    path = Path(preset)
    if path.is_file():
        return path
    path = configs_dir() / kind / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"{kind[:-1] if kind.endswith('s') else kind} preset {str(preset)!r}: no such file; "
                          f"presets are {preset_names(kind)}")
    return path
