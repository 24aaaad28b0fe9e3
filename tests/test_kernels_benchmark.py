"""The kernel benchmark runs end to end at tiny shapes on CPU and reports every implementation."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"


def test_kernel_benchmark_quick_runs_on_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(bench)
    out = tmp_path / "table.md"
    assert bench.main(["--quick", "--no-compile", "--reps", "1", "--ops", "flow_matching,ada_rms,attention",
                       "--out", str(out)]) == 0
    table = out.read_text()
    assert "Device: **CPU" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    impls = {(r.split("|")[1].strip(), r.split("|")[3].strip()) for r in rows}
    assert ("flow_matching_loss", "eager") in impls and ("flow_matching_loss", "triton") in impls
    assert {("attention (pi0 mask)", i) for i in ("eager", "sdpa", "flex")} <= impls
    eager_attention = next(r for r in rows if "attention" in r and "| eager |" in r)
    assert float(eager_attention.split("|")[4]) > 0  # a measured forward time
