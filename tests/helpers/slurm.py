"""The local SLURM of the launcher tests (slurm/local_cluster.sh: 2 simulated nodes) and what the
SLURM test files share: the stand-in trainer's config and uninterrupted curve, waiting for a sweep.
The `slurm_cluster` fixture (tests/conftest.py) starts the cluster."""
from __future__ import annotations

import os
import time
from pathlib import Path

from helpers.launch_standin import STANDIN_ENTRY, losses, run
from megavla.config import load_config
from megavla.launch import sweep

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "slurm" / "local_cluster.sh"
SLURM_DIR = Path(os.environ.get("MEGAVLA_SLURM_DIR", "/tmp/megavla-slurm"))


def standin_config(run_dir: Path, *overrides: str, executor: str = "slurm"):
    slurm = ["launch.master_addr=127.0.0.1"] if executor == "slurm" else []
    return load_config(overrides=[f"train.run_dir={run_dir}", f"launch.entry={STANDIN_ENTRY}",
                                  "train.save_every=0", f"launch.executor={executor}", *slurm, *overrides])


def standin_reference(run_dir: Path, steps: int, monkeypatch) -> list[float]:
    """The uninterrupted curve, in process (the stand-in's batches do not depend on world size)."""
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    cfg = standin_config(run_dir, f"train.steps={steps}", executor="local")
    run_dir.mkdir(parents=True)
    assert run(cfg) == 0
    return losses(run_dir)


def wait_all_finished(out_dir: Path, n: int, timeout_s: float) -> list[dict]:
    deadline = time.time() + timeout_s
    rows: list[dict] = []
    while time.time() < deadline:
        rows = sweep.status_rows(out_dir)
        if len(rows) == n and all(r["state"] == "finished" for r in rows):
            return rows
        time.sleep(1)
    raise TimeoutError(f"sweep not finished after {timeout_s} s: {rows}")
