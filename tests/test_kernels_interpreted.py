"""Runs the Triton kernel tests (tests/test_kernels_triton.py) under the CPU interpreter.

TRITON_INTERPRET must be set before the kernel modules are imported, and must not leak into the
other test modules of this process: so the kernel tests run in a child pytest with the variable set
only in the child's environment.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]


def test_triton_kernels_match_references_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", str(REPO / "tests" / "test_kernels_triton.py"), "-q",
           "-m", "not gpu and not slow", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    report = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, f"interpreted kernel tests failed:\n{report}"
    passed = re.search(r"(\d+) passed", proc.stdout)
    # every CPU case must actually have run: a skip here would mean the interpreter was not active
    assert passed and int(passed.group(1)) >= 15, f"too few interpreted kernel tests ran:\n{report}"
    assert " skipped" not in proc.stdout.splitlines()[-1], f"interpreted kernel tests skipped:\n{report}"
