"""What a sweep file defines: its grid points, their run names and configs (`megavla sweep`'s input).

Read by both the submitter (launch/sweep.py) and the report (launch/sweep_report.py), so it lives
below both; the file format is described in launch/sweep.py's docstring.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

from megavla.config import Config, ConfigError, load_config
from megavla.config.core import read_yaml

SWEEP_KEYS = {"base", "out_dir", "overrides", "grid"}


@dataclass
class SweepRun:
    name: str
    overrides: list[str]
    cfg: Config


def _format_value(value) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text) or "empty"


def run_names(grid: dict[str, list]) -> tuple[list[str], list[tuple]]:
    """Names and value tuples of every grid point (product in file order).

    A name uses each key's last dotted part (``data.mixture.human`` -> ``human``) unless two keys
    share it, then the full key.
    """
    keys = list(grid)
    short = [k.split(".")[-1] for k in keys]
    labels = [s if short.count(s) == 1 else k.replace(".", "-") for k, s in zip(keys, short)]
    points = list(itertools.product(*(grid[k] for k in keys)))
    names = ["_".join(f"{lab}-{_format_value(v)}" for lab, v in zip(labels, point)) for point in points]
    return names, points


def read_sweep(sweep_file: str | Path,
               out_dir: str | Path | None = None) -> tuple[Path, Path | None, list[str], list[tuple[str, list[str]]]]:
    """Read and check a sweep file without building any config -> (out_dir, base config path, fixed
    overrides, [(run name, its grid overrides), ...])."""
    sweep_file = Path(sweep_file)
    spec = read_yaml(sweep_file)
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"{sweep_file}: unknown key(s) {sorted(unknown)}; a sweep has {sorted(SWEEP_KEYS)}")
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{sweep_file}: 'grid' must map dotted keys to lists, e.g. train.seed: [0, 1]")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{sweep_file}: grid.{key} must be a non-empty list, got {values!r}")
        if key.startswith("launch.") or key == "train.run_dir":
            raise ConfigError(f"{sweep_file}: grid.{key}: launch settings and run_dir are per sweep "
                              "(one job array shares them); put them in the base config or flags")
    base = spec.get("base")
    base_path = (sweep_file.parent / base) if base else None
    out_dir = Path(out_dir or spec.get("out_dir") or f"runs/sweeps/{sweep_file.stem}")
    fixed = list(spec.get("overrides") or [])
    names, points = run_names(grid)
    if len(set(names)) != len(names):
        raise ConfigError(f"{sweep_file}: grid values give duplicate run names (values that differ "
                          "only in characters other than letters, digits and . + -)")
    points_overrides = [[f"{k}={_yaml_scalar(v)}" for k, v in zip(grid, point)] for point in points]
    return out_dir, base_path, fixed, list(zip(names, points_overrides))


def expand(sweep_file: str | Path, extra_overrides: list[str] = (),
           out_dir: str | Path | None = None) -> tuple[Path, list[SweepRun]]:
    """Read a sweep file -> (out_dir, resolved runs). All config errors surface here, before any
    submission, naming the sweep file and the grid point."""
    out_dir, base_path, fixed, points = read_sweep(sweep_file, out_dir)
    runs = []
    for name, point_overrides in points:
        overrides = [*fixed, *point_overrides, f"train.run_dir={(out_dir / name).resolve()}",
                     *extra_overrides]
        try:   # model vs data: sweep.check_runs checks every run and names each bad one
            cfg = load_config(base_path, overrides, check=False)
        except ConfigError as e:
            raise ConfigError(f"{sweep_file}: run {name}: {e}") from None
        runs.append(SweepRun(name, point_overrides, cfg))
    return out_dir, runs


def _yaml_scalar(value) -> str:
    """A grid value written back as override text that parses to the same value."""
    import yaml
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
