"""The repo root never shadows an installed package in the test suite (issue 24, item 1).

`kernels/`, `launch/` and `data_shards/` at the root install as `megavla.kernels` etc.; a package of
the same top-level name from PyPI (Hugging Face's `kernels`, which transformers >= 5 imports) must
win in tests exactly as it does in a user's environment, even under `python -m pytest` from the root.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, SHADOWING_FOLDERS

PROBE_ENV = "MEGAVLA_SHADOW_PROBE"


def test_root_is_not_on_sys_path():
    assert all(Path(p or os.getcwd()).resolve() != REPO_ROOT for p in sys.path if os.path.isdir(p or ".")), \
        f"{REPO_ROOT} is on sys.path: its top-level folders can shadow installed packages"


@pytest.mark.parametrize("name", SHADOWING_FOLDERS)
def test_top_level_names_do_not_resolve_to_the_repo(name):
    spec = importlib.util.find_spec(name)
    origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    assert origin is None or not origin.is_relative_to(REPO_ROOT), \
        f"`import {name}` resolves to {origin}, the repo's folder, not an installed package"


def test_installed_package_wins_under_python_m_pytest_from_the_root(tmp_path):
    """A stand-in `kernels` package on PYTHONPATH (behind the working directory, where
    `python -m` puts the root) is the one a test session imports."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("STANDIN = True\n")
    env = {**os.environ, "PYTHONPATH": str(site), PROBE_ENV: "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           f"tests/{Path(__file__).name}::test_probe_imports_the_installed_kernels"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-1000:]


@pytest.mark.skipif(not os.environ.get(PROBE_ENV), reason="run in a subprocess by the test above")
def test_probe_imports_the_installed_kernels():
    import kernels
    assert getattr(kernels, "STANDIN", False), f"imported {kernels.__file__}, not the installed package"
