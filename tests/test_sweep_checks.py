"""Sweeps check every run's config before they submit any (megavla/config/checks.py: model vs data vs
tokenizers vs the shard sets' manifests), the shipped sweeps pass that check on data written by the
real `megavla data synth` + `megavla tokenizer train`, a failed run is `failed` with its one-line
error in `sweep status` and the report, and `sweep report --sweep` works when the sources were given
on the sweep's command line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megavla.config import ConfigError, load_config
from megavla.config.checks import check_config, config_problems
from megavla.launch import rundir, sweep
from megavla.launch.executor import prepare_run
from helpers.launch_standin import STANDIN_ENTRY, use_standin

REPO = Path(__file__).resolve().parents[1]
SHIPPED_SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))
FAILING_ENTRY = "test_sweep_checks:fail_on_seed_1"
FAILURE = "batch images are (32, 32) px but model.image_size=224"


def fail_on_seed_1(cfg, resume=None):
    """A trainer that fails like the first forward of a mis-sized model (seed 1), else the stand-in."""
    if cfg.train.seed == 1:
        raise ValueError(f"{FAILURE}; set data.image_size=224\n(a second line the error does not need)")
    from helpers.launch_standin import run
    return run(cfg, resume=resume)


def _shards(root: Path, image_size: int) -> list[str]:
    """robot + human sets and tokenizers from the real producers; the overrides that name them."""
    from megavla.data.cli import main as data_main
    from megavla.tokenizers.cli import main as tokenizer_main
    out = root / f"data{image_size}"
    assert data_main(["synth", "--out", str(out), "--scenes", "2", "--tasks", "1", "--episodes-per-combo", "1",
                      "--image-size", str(image_size), "--workers", "1", "--no-progress"]) == 0
    assert tokenizer_main(["train", "--shards", str(out), "--out", str(out / "tokenizers")]) == 0
    return [f"data.sources.robot={out}/robot", f"data.sources.human={out}/human",
            f"train.tokenizer_dir={out}/tokenizers"]


@pytest.fixture(scope="module")
def data64(tmp_path_factory):
    return _shards(tmp_path_factory.mktemp("shards"), 64)


@pytest.fixture(scope="module")
def data32(tmp_path_factory):
    return _shards(tmp_path_factory.mktemp("shards"), 32)


def test_model_vs_data_sizes_are_named_with_values_and_fix():
    cfg = load_config(REPO / "configs" / "demo.yaml", ["model.preset=small"])
    problems = config_problems(cfg, read_files=False)
    assert [p.key for p in problems] == ["data.image_size"]
    assert problems[0].message.startswith("model.image_size=224 (preset small) but data.image_size=32")
    assert "set data.image_size=224" in problems[0].message
    cfg = load_config(REPO / "configs" / "demo.yaml", ["data.chunk_length=5", "data.max_action_dim=7",
                                                       "data.max_state_dim=9"])
    messages = [p.message for p in config_problems(cfg, read_files=False)]
    assert messages == [
        "model.chunk_length=10 but data.chunk_length=5: the model's action chunk length must equal the batches'; "
        "set model.chunk_length=5 (or data.chunk_length=10)",
        "model.action_dim=32 but data.max_action_dim=7: the model's action dims must equal the batches'; "
        "set model.action_dim=7 (or data.max_action_dim=32)",
        "model.state_dim=32 but data.max_state_dim=9: the model's state dims must equal the batches'; "
        "set model.state_dim=9 (or data.max_state_dim=32)"]
    with pytest.raises(ConfigError, match="^3 problems:\n  model.chunk_length=10"):
        check_config(cfg)
    with pytest.raises(ConfigError, match="model.preset='huge' is unknown"):
        check_config(load_config(overrides=["model.preset=huge"]))
    check_config(load_config(REPO / "configs" / "demo.yaml"))   # the demo itself is consistent


def test_shard_manifest_and_tokenizers_are_checked_when_they_exist(data64):
    demo = REPO / "configs" / "demo.yaml"
    assert config_problems(load_config(demo, data64)) == []     # 64 px frames downscaled to 32: fine
    cfg = load_config(demo, [*data64, "data.image_size=128", "model.image_size=128"])
    problems = config_problems(cfg)
    assert [p.key for p in problems] == ["data.sources.robot", "data.sources.human"]
    assert "stores 64 px frames (manifest generator.image_size) but data.image_size=128: they would be " \
           "upscaled 2x; write the set at --image-size 128" in problems[0].message
    # Dims: the synth robot has fewer action dims than the human hand (norm_stats.json).
    cfg = load_config(demo, [*data64, "data.max_action_dim=7", "model.action_dim=7"])
    problems = config_problems(cfg)
    assert problems and all(p.key == "data.max_action_dim" for p in problems)
    assert "human/ego has" in problems[0].message and "every human/ego episode would be skipped" in problems[0].message
    # Tokenizers: ids beyond the model's vocabulary.
    cfg = load_config(demo, [*data64, "model.text_vocab_size=50"])
    [problem] = config_problems(cfg)
    assert problem.key == "model.text_vocab_size" and "the text tokenizer has" in problem.message
    assert "but model.text_vocab_size=50" in problem.message


@pytest.mark.parametrize("spec", SHIPPED_SWEEPS, ids=[p.stem for p in SHIPPED_SWEEPS])
def test_every_run_of_every_shipped_sweep_passes_the_config_check(spec, data64, tmp_path):
    # The README's data (megavla data synth --image-size 64) and tokenizers, sources on the command line.
    out_dir, runs = sweep.expand(spec, data64, out_dir=tmp_path / "sw")
    assert len(runs) >= 4
    for run in runs:
        assert config_problems(run.cfg) == [], run.name
    sweep.check_runs(spec, runs)   # what submit_sweep runs before it submits anything
    assert sweep.main([str(spec), *data64, "--out-dir", str(tmp_path / "sw"), "--dry-run"]) == 0


def test_a_sweep_with_bad_runs_submits_nothing_and_names_each(data32, tmp_path, capsys):
    # The transfer sweep as it shipped before: small's 224 px model on demo.yaml's 32 px data.
    old = tmp_path / "old_transfer.yaml"
    old.write_text(json.dumps({"base": str(REPO / "configs" / "demo.yaml"), "out_dir": str(tmp_path / "old"),
                               "overrides": ["train.steps=2000"],
                               "grid": {"model.preset": ["tiny", "small"], "train.seed": [0, 1]}}))
    assert sweep.main([str(old), *data32]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"megavla sweep: error: {old}: 2 of 4 run(s) would fail; nothing submitted.")
    assert [line.split(":")[0] for line in err[1:]] == ["  run preset-small_seed-0", "  run preset-small_seed-1"]
    assert "model.image_size=224 (preset small) but data.image_size=32" in err[1]
    assert not (tmp_path / "old").exists()   # not even the tiny runs started
    # The shipped transfer sweep trains both presets at 64 px: 32 px data is refused for every run.
    assert sweep.main([str(REPO / "configs" / "sweeps" / "transfer.yaml"), *data32,
                       "--out-dir", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert "16 of 16 run(s) would fail" in err and "stores 32 px frames" in err
    assert not (tmp_path / "new").exists()


def test_failed_run_is_failed_with_its_error_in_status_and_report(tmp_path, monkeypatch, capsys):
    use_standin(monkeypatch)
    spec = tmp_path / "sweep.yaml"
    spec.write_text(json.dumps({"out_dir": str(tmp_path / "sw"), "grid": {"train.seed": [0, 1]},
                                "overrides": ["train.steps=3", f"launch.entry={FAILING_ENTRY}"]}))
    assert sweep.main([str(spec)]) == 0            # one failed run does not stop the sweep
    rows = {r["run"]: r for r in sweep.status_rows(tmp_path / "sw")}
    assert (rows["seed-0"]["state"], rows["seed-0"]["error"]) == ("finished", "")
    assert rows["seed-1"]["state"] == "failed"
    assert rows["seed-1"]["error"] == f"rank 0: ValueError: {FAILURE}; set data.image_size=224"
    capsys.readouterr()
    assert sweep.main(["status", str(tmp_path / "sw")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2].split()[:2] == ["seed-1", "failed"]
    assert table[-2:] == ["1 failed:", f"  seed-1: rank 0: ValueError: {FAILURE}; set data.image_size=224"]
    assert sweep.main(["report", str(tmp_path / "sw"), "--sweep", str(spec)]) == 0
    printed = capsys.readouterr().out
    assert "not finished: seed-1 (failed)" in printed and f"seed-1 failed: rank 0: ValueError: {FAILURE}" in printed
    md = (tmp_path / "sw" / "sweep_report.md").read_text()
    assert "2 runs: 1 failed, 1 finished." in md and f"- `seed-1`: rank 0: ValueError: {FAILURE}" in md
    row = next(line for line in md.splitlines() if line.startswith("| seed-1 |"))
    assert "| failed |" in row and row.rstrip(" |").endswith("set data.image_size=224")
    # A re-run submits the failed run again (and only it).
    assert sweep.submit_sweep(spec, dry_run=True) == ["seed-1"]


def test_job_that_died_without_recording_is_failed_with_the_logs_error(tmp_path):
    run = tmp_path / "run"
    rundir.update_launch_record(run, status="running", executor="local", job_id="999999999",
                                submitit_folder=str(run / "submitit"))
    assert rundir.run_outcome(run, 10) == ("failed", (
        "job 999999999 ended while running, without recording an outcome (killed, out of memory, or failed "
        f"before Python started); logs: {run / 'submitit'}"))
    (run / "submitit").mkdir()
    (run / "submitit" / "999999999_0_log.err").write_text(
        "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
        f"[rank0]: ValueError: {FAILURE}; set data.image_size=224\n")
    assert rundir.run_outcome(run, 10) == (
        "failed", f"ValueError: {FAILURE}; set data.image_size=224 (job 999999999; logs: {run / 'submitit'})")
    # The first recorded failure of an attempt is kept (a peer rank fails next, on the broken group).
    rundir.record_failure(run, "rank 1: ValueError: the cause")
    rundir.record_failure(run, "rank 0: RuntimeError: Connection closed by peer")
    assert rundir.run_outcome(run, 10) == ("failed", "rank 1: ValueError: the cause")


def test_report_with_sources_given_on_the_sweep_command_line(tmp_path, capsys):
    spec = tmp_path / "sweep.yaml"   # like transfer.yaml: a mixture axis, sources only on the command line
    spec.write_text(json.dumps({"base": str(REPO / "configs" / "demo.yaml"), "out_dir": str(tmp_path / "sw"),
                                "overrides": ["train.steps=4", f"launch.entry={STANDIN_ENTRY}"],
                                "grid": {"data.mixture.human": [0.0, 0.5], "train.seed": [0, 1]}}))
    cli = [f"data.sources.robot={tmp_path}/robot", f"data.sources.human={tmp_path}/human", "train.lr=0.01"]
    with pytest.raises(ConfigError, match="no source named 'human'"):
        sweep.expand(spec)            # what the report did before: re-resolve without the command line
    out_dir, runs = sweep.expand(spec, cli)
    for run in runs[:3]:              # the 4th (human-0.5_seed-1) never submitted: missing
        d = prepare_run(run.cfg)
        (d / rundir.METRICS_FILE).write_text(json.dumps({"step": 4, "loss/total": 3.0, "loss/flow": 1.5}) + "\n")
        rundir.update_launch_record(d, status="finished", executor="local", job_id="999999999")
    assert sweep.main(["report", str(out_dir), "--sweep", str(spec)]) == 0
    assert "4 runs, 3 finished; not finished: human-0.5_seed-1 (missing)" in capsys.readouterr().out
    md = (out_dir / "sweep_report.md").read_text()
    assert "Swept axes: `data.mixture.human`, `train.seed`" in md   # train.lr is no axis: the missing run has it too
    row = next(line for line in md.splitlines() if line.startswith("| human-0.5_seed-1 |"))
    assert [c.strip() for c in row.strip("|").split("|")][:5] == ["human-0.5_seed-1", "missing", "-", "0.5", "1"]


def test_status_shows_the_flow_loss_like_the_demo_and_labels_both(tmp_path, capsys):
    d = tmp_path / "run"
    prepare_run(load_config(overrides=[f"train.run_dir={d}", "train.steps=4"]))
    (d / rundir.METRICS_FILE).write_text("\n".join(json.dumps(r) for r in [
        {"step": 2, "loss/total": 9.5, "loss/flow": 1.9}, {"step": 4, "loss/total": 9.25, "loss/flow": 1.63}]))
    assert sweep.main(["status", str(d)]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[:5] == ["RUN", "STATE", "STEP", "FLOW_LOSS", "TOTAL_LOSS"]
    assert row.split()[2:5] == ["4/4", "1.63", "9.25"]
