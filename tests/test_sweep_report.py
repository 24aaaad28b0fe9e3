"""`megavla sweep report DIR`: a constructed sweep dir in the real run-dir layout (config.yaml and
launch.json written by the launcher's prepare_run, checkpoints in the trainer's layout, metrics.jsonl
and eval_<tag>.json as documented), with a finished grid, an interrupted run and a missing one.
The report on runs written by the real trainer is tested in test_eval_experiments.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megavla.eval.stats import wilson_interval
from megavla.launch import rundir, sweep
from megavla.launch.executor import prepare_run
from megavla.launch.sweep_report import collect, swept_axes
from helpers.launch_standin import STANDIN_ENTRY, save_checkpoint

LOSSES = {("tiny", 0.0): 1.0, ("tiny", 0.5): 0.8, ("small", 0.0): 0.6, ("small", 0.5): 0.5}


@pytest.fixture
def sweep_dir(tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(json.dumps({"out_dir": str(tmp_path / "sw"), "overrides": [
        # model.image_size=32: both presets read (and data.image_size follows) 32 px, so the image size
        # is not a second axis beside model.preset
        "train.steps=4", f"launch.entry={STANDIN_ENTRY}", "model.image_size=32", f"data.sources.robot={tmp_path}/robot",
        f"data.sources.human={tmp_path}/human"],
        "grid": {"model.preset": ["tiny", "small"], "data.mixture.human": [0.0, 0.5], "train.seed": [0, 1]}}))
    out_dir, runs = sweep.expand(spec)
    for run in runs:
        preset, human, seed = run.cfg.model.preset, run.cfg.data.mixture["human"], run.cfg.train.seed
        if (preset, human, seed) == ("small", 0.5, 1):
            continue  # never submitted: missing
        d = prepare_run(run.cfg)
        base = LOSSES[(preset, human)] + 0.1 * seed
        steps = 2 if (preset, human) == ("small", 0.5) else 4  # small/0.5/seed 0: interrupted at step 2
        with (d / rundir.METRICS_FILE).open("w") as f:
            for step in range(1, steps + 1):  # last 5 logged values: the 4 lines' losses average to base
                f.write(json.dumps({"step": step, "loss/total": base + (step - 2.5) * 0.01,
                                    "loss/flow": base / 2}) + "\n")
            f.write("{cut by preempt\n")  # an unreadable line is skipped, not fatal
        save_checkpoint(d, steps, torch.zeros(2))
        rundir.update_launch_record(d, status="finished" if steps == 4 else "requeued", executor="local",
                                    job_id="999999999")
        if steps == 4:
            k, n = int(round(10 * (1.2 - base))), 10
            lo, hi = wilson_interval(k, n)
            (d / "eval_targets.json").write_text(json.dumps({
                "closed_loop": {"successes": k, "episodes": n, "success_rate": k / n, "ci95": [lo, hi]},
                "offline": {"action_mse": base / 3, "baselines": {"zero": 0.6, "mean_action": 0.25}}}))
    (out_dir / rundir.SUBMITIT_DIR).mkdir()
    return spec, out_dir


def test_report_gathers_every_run_and_names_the_missing_and_partial(sweep_dir, capsys):
    spec, out_dir = sweep_dir
    assert sweep.main(["report", str(out_dir), "--sweep", str(spec)]) == 0
    printed = capsys.readouterr().out
    assert "8 runs, 6 finished" in printed
    assert "preset-small_human-0.5_seed-0 (interrupted)" in printed and "preset-small_human-0.5_seed-1 (missing)" in printed
    md = (out_dir / "sweep_report.md").read_text()
    assert "8 runs: 6 finished, 1 interrupted, 1 missing." in md
    assert "`preset-small_human-0.5_seed-1` (missing)" in md
    table = [line for line in md.splitlines() if line.startswith("| preset-")]
    assert len(table) == 8  # every run has a row, the missing one included
    row = next(line for line in table if line.startswith("| preset-tiny_human-0.5_seed-1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["finished", "4/4"] and float(cells[7]) == pytest.approx(0.9)  # final loss
    assert cells[10].startswith("0.30 [") and "(3/10)" in cells[10]
    # Parameters: the model axis is swept, so each run's model size is a column (meta-device count).
    small_row = next(line for line in table if line.startswith("| preset-small_human-0.0_seed-0 |"))
    tiny_m, small_m = float(cells[6].rstrip("M")), float(small_row.strip("|").split("|")[6].strip().rstrip("M"))
    assert 0 < tiny_m < small_m
    for axis in ("model.preset", "data.mixture.human"):
        png = out_dir / f"sweep_{axis}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"![{axis}]({png.name})" in md
    assert not (out_dir / "sweep_train.seed.png").exists()  # seeds are error bars, not an axis plot


def test_aggregation_means_over_seeds(sweep_dir):
    from megavla.launch.sweep_report import aggregate
    spec, out_dir = sweep_dir
    entries = collect(out_dir, spec)
    axes = swept_axes(entries)
    assert axes == ["data.mixture.human", "model.preset", "train.seed"]
    agg = aggregate(entries, "data.mixture.human", axes, "final_loss")
    tiny = {p[0]: p for p in agg["preset=tiny"]}
    assert tiny[0.0][1] == pytest.approx(1.05) and tiny[0.0][4] == 2  # mean over seeds 0, 1
    assert tiny[0.0][2] == pytest.approx(np.std([1.0, 1.1], ddof=1))
    small = {p[0]: p for p in agg["preset=small"]}
    assert set(small) == {0.0}  # small/0.5 has no finished run: not plotted, but named in the report
    success = aggregate(entries, "data.mixture.human", axes, "targets:success_rate")
    assert {p[0]: p[1] for p in success["preset=tiny"]} == {0.0: pytest.approx(0.15), 0.5: pytest.approx(0.35)}


def test_report_without_sweep_file_lists_dirs_without_config(sweep_dir, tmp_path, capsys):
    _, out_dir = sweep_dir
    (out_dir / "stray_run").mkdir()
    assert sweep.main(["report", str(out_dir), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "sweep_report.md").read_text()
    assert "`stray_run` (no config.yaml)" in md
    assert "8 runs: 6 finished, 1 interrupted, 1 no config.yaml." in md


def test_report_errors(tmp_path, capsys):
    assert sweep.main(["report", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert sweep.main(["report", str(tmp_path)]) == 2
    assert "no run directories" in capsys.readouterr().err
