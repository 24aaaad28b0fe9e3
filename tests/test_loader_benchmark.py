"""The reader benchmark (benchmarks/loader.py: issue 16's per-worker ratio) runs end to end at tiny
sizes: generated shards, trained tokenizers, 0/1/2 DataLoader workers, and every row reports a
measured rate and its ratios to decode-only."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "loader.py"


def test_loader_benchmark_quick_runs_and_reports_every_row(capsys):
    spec = importlib.util.spec_from_file_location("bench_loader", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--workers", "0", "1"]) == 0
    out = capsys.readouterr().out
    assert "samples per CPU-s" in out
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines()
            if line.startswith("| ") and "---" not in line and "workers" not in line}
    assert set(rows) == {"0", "1", "0, no tokenizers"}
    for label, cells in rows.items():
        wall_rate = float(cells[0].replace(",", ""))
        assert wall_rate > 0, label
        median, spread = cells[5].strip().split(" (")   # "0.71 (0.69-0.74)": per-round ratios
        # A --quick round can end inside one tick of a worker's CPU clock: nan is allowed there only.
        assert float(median) > 0 or (label == "1" and math.isnan(float(median))), (label, cells)
        assert spread.endswith(")")
