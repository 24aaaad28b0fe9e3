"""Shared test setup: small, deterministic, CPU-only by default."""
import os
import sys
from pathlib import Path

# The repo root holds folders named like PyPI packages (`kernels/` is Hugging Face's kernel hub,
# which transformers >= 5 imports; `launch/`): they install as `megavla.kernels` etc., never as
# top-level names. `python -m pytest` (and `python -c`) put the working directory first on
# sys.path, so from the root `import kernels` would find our folder instead of the installed
# package. Tests must see what a user's installed environment sees: drop the root from sys.path
# before any test module (or transformers) is imported, and forget a top-level module that an
# earlier plugin may already have taken from the root. tests/test_import_hygiene.py fails if this
# stops working.
REPO_ROOT = Path(__file__).resolve().parents[1]
SHADOWING_FOLDERS = ("kernels", "launch", "data_shards")


def _is_repo_root(entry: str) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() == REPO_ROOT
    except OSError:
        return False


sys.path[:] = [entry for entry in sys.path if not _is_repo_root(entry)]
for _name in SHADOWING_FOLDERS:
    _origin = getattr(sys.modules.get(_name), "__file__", None) or ""
    if _origin and Path(_origin).resolve().is_relative_to(REPO_ROOT):
        del sys.modules[_name]

# Keep the 2-core CI machine responsive and results deterministic.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

# In-process training tests set these; left behind, they leak into jobs that later tests submit
# (sbatch and submitit export the submitting environment), e.g. two tasks that both think RANK=0.
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _restore_distributed_env():
    saved = {k: os.environ.get(k) for k in _DIST_VARS}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium driven over CDP (tests/helpers/browser.py); skips where Chromium is not installed."""
    from helpers.browser import CHROMIUM_PACKAGE, Browser, find_chromium

    if find_chromium() is None:
        pytest.skip(f"headless Chromium not found: install the Debian package (apt-get install "
                    f"{CHROMIUM_PACKAGE}) or set $CHROMIUM to a Chromium/Chrome executable")
    with Browser() as instance:
        yield instance


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running local SLURM (slurm/local_cluster.sh, 2 simulated nodes); SLURM_CONF and the sacct shim
    (slurm/bin) exported to jobs too. Skips, with the reason, where SLURM cannot be started."""
    import shutil
    import subprocess

    from helpers.slurm import CLUSTER, REPO, SLURM_DIR
    if shutil.which("slurmctld") is None and os.geteuid() != 0:
        pytest.skip("SLURM is not installed and installing it needs root (slurm/local_cluster.sh start)")
    was_running = subprocess.run([str(CLUSTER), "status"], capture_output=True).returncode == 0
    try:
        started = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip("slurm/local_cluster.sh start took over 300 s")
    if started.returncode != 0:
        pytest.skip(f"local SLURM could not be started: {started.stderr.strip()[-600:]}")
    patch = pytest.MonkeyPatch()
    patch.setenv("SLURM_CONF", str(SLURM_DIR / "slurm.conf"))
    patch.setenv("PATH", f"{REPO / 'slurm' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    yield SLURM_DIR
    patch.undo()
    if not was_running:
        subprocess.run([str(CLUSTER), "stop"], capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def tiny_synth_data(tmp_path_factory):
    """A tiny real shard set and its tokenizers, made by the CLI a user runs (`megavla data synth`,
    `megavla tokenizer train`): ROOT/shards/{robot,human} and ROOT/tok. Shared read-only: a test that
    writes there copies it first."""
    import subprocess
    root = tmp_path_factory.mktemp("tiny_synth_data")
    for argv in (["data", "synth", "--out", str(root / "shards"), "--scenes", "1", "--tasks", "2",
                  "--episodes-per-combo", "2", "--image-size", "32", "--workers", "1", "--no-progress",
                  "--shard-size-mb", "1"],
                 ["tokenizer", "train", "--shards", str(root / "shards"), "--out", str(root / "tok")]):
        done = subprocess.run([sys.executable, "-m", "megavla.cli", *argv], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"megavla {' '.join(argv[:2])} failed:\n{done.stderr[-2000:]}"
    return root

