"""The presets in configs/ ship with the package (megavla.configs) and are found in a NON-editable
install, where no path relative to a source file reaches the checkout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from megavla.config.shipped import configs_dir, preset_names, resolve_preset

REPO_ROOT = Path(__file__).resolve().parents[1]

# What `pip install .` builds from: the package sources and the build files (no tests, runs, docs).
BUILD_INPUTS = ("setup.py", "pyproject.toml", "README.md", "megavla", "configs", "kernels", "launch", "data_shards")

# Run inside the install only (the checkout is nowhere on sys.path): where the package and its
# presets come from, and that the loaders read them (torch-free imports: the test stays cheap; the
# experiment specs' loader reads its presets through the same resolve_preset: test_experiment_spec).
PROBE = """
import sys
from pathlib import Path
import megavla
from megavla.config import load_config
from megavla.config.core import read_yaml
from megavla.config.shipped import configs_dir, resolve_preset
from megavla.demo import demo_config_path
site = Path(sys.argv[1]).resolve()
toy = resolve_preset("experiments", "toy")
for path in (Path(megavla.__file__), configs_dir(), demo_config_path(), toy):
    assert path.resolve().is_relative_to(site), f"{path} is outside the install {site}"
assert load_config(demo_config_path()).model.preset == "tiny"
assert load_config(configs_dir() / "pi05-3b.yaml").model.preset == "pi05-3b"   # defaults: [model/...]
print(read_yaml(toy)["world"]["scenes"], read_yaml(resolve_preset("experiments", "mini"))["world"]["scenes"])
"""


def test_the_checkout_finds_its_presets_through_the_package():
    assert configs_dir().resolve() == (REPO_ROOT / "configs").resolve()
    assert preset_names("experiments") == sorted(p.stem for p in (REPO_ROOT / "configs" / "experiments").glob("*.yaml"))
    assert resolve_preset("experiments", "toy").name == "toy.yaml"


def test_a_non_editable_install_ships_and_finds_the_presets(tmp_path):
    src, site = tmp_path / "src", tmp_path / "site"
    src.mkdir()
    for name in BUILD_INPUTS:   # a copy: the build writes build/ and *.egg-info beside its input
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                              "--no-compile", "--no-index", "-q", "--target", str(site), str(src)],
                             capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    shipped = sorted(p.relative_to(REPO_ROOT / "configs") for p in (REPO_ROOT / "configs").rglob("*.yaml"))
    assert shipped and len(shipped) >= 10
    for rel in shipped:
        installed = site / "megavla" / "configs" / rel
        assert installed.is_file(), f"configs/{rel} is not in the install"
        assert installed.read_bytes() == (REPO_ROOT / "configs" / rel).read_bytes()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)   # ahead of the editable install's finder (appended to sys.meta_path)
    probe = subprocess.run([sys.executable, "-c", PROBE, str(site)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.split() == ["2", "8"]
