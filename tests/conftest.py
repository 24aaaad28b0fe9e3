"""Shared test setup: small, deterministic, CPU-only by default."""
import os

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
