"""The launcher without SLURM: flags, preflight errors, the local executor's train and requeue path,
sweeps run one by one. The trainer is the stand-in in tests/helpers/launch_standin.py (same contract)."""
from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import pytest

from megavla.config import ConfigError, load_config
from megavla.launch import cli, rundir, sweep
from megavla.launch.executor import LaunchError, preflight, submit_run
from helpers.launch_standin import STANDIN_ENTRY, losses, use_standin, wait_for_lines


def _cfg(run_dir: Path, *overrides: str):
    return load_config(overrides=[f"train.run_dir={run_dir}", f"launch.entry={STANDIN_ENTRY}",
                                  "train.save_every=0", *overrides])


def test_flags_become_launch_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("launch: {nodes: 3, partition: yaml_part}\n")
    args = cli.build_parser().parse_args([str(cfg_file), "train.steps=7", "--executor", "slurm",
                                          "--partition", "gpu", "--gpus-per-node", "8", "--time", "90"])
    cfg = load_config(args.config, [*args.overrides, *cli.flag_overrides(args)])
    lc = cfg.launch
    assert (lc.executor, lc.partition, lc.nodes, lc.gpus_per_node, lc.time_min) == ("slurm", "gpu", 3, 8, 90)
    assert lc.world_size == 24 and cfg.train.steps == 7


@pytest.mark.parametrize("override, message", [
    ("launch.nodes=2", "local executor runs on one node"),
    ("launch.signal_delay_s=4000", "shorter than the time limit"),
    ("launch.entry=no_colon", "package.module:function"),
])
def test_bad_launch_settings_fail_before_submission(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def _fake_bin(tmp_path: Path, name: str, body: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def test_preflight_errors_name_the_problem(tmp_path, monkeypatch):
    lc = _cfg(tmp_path, "launch.executor=slurm").launch
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(LaunchError, match="no `sbatch` on PATH"):
        preflight(lc)
    # A cluster with a CPU partition (default) and a GPU partition, as sinfo -o '%P|%G|%D' prints it.
    bin_dir = _fake_bin(tmp_path, "sinfo", "printf 'cpu*|(null)|4\\ngpu|gpu:h100:8|2\\n'")
    _fake_bin(tmp_path, "sbatch", "exit 1")
    monkeypatch.setenv("PATH", str(bin_dir))
    lc.partition = "gpus"
    with pytest.raises(LaunchError, match=r"'gpus': sinfo does not know it; partitions are \['cpu', 'gpu'\]"):
        preflight(lc)
    lc.partition, lc.gpus_per_node = None, 8  # default partition = cpu
    with pytest.raises(LaunchError, match="partition 'cpu', which has no GPUs"):
        preflight(lc)
    lc.partition = "gpu"
    preflight(lc)  # fine: no error


@pytest.mark.slow  # CI time: covered in the default suite by the SLURM / real-trainer tests
def test_local_executor_two_ranks_train_like_one_process(tmp_path, monkeypatch):
    use_standin(monkeypatch)
    from helpers.launch_standin import run
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    reference = _cfg(tmp_path / "ref", "train.steps=5")
    Path(reference.train.run_dir).mkdir(parents=True)
    assert run(reference) == 0
    cfg = _cfg(tmp_path / "run", "train.steps=5", "launch.tasks_per_node=2")
    job = submit_run(cfg)
    assert job.results() == [0, 0]
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "ref"), rel=1e-5)
    record = rundir.read_launch_record(tmp_path / "run")
    assert record["status"] == "finished" and record["world_size"] == 2 and record["final_step"] == 5
    assert record["job_id"] == job.job_id and record["executor"] == "local"


@pytest.mark.slow  # CI time: covered in the default suite by the SLURM / real-trainer tests
def test_local_preemption_checkpoints_requeues_and_resumes(tmp_path, monkeypatch):
    """SLURM's preemption warning (USR2 to every task, as `--signal=USR2` delivers it) once training
    runs: the ranks save at one step boundary, the job requeues, resumes from that step and ends
    with the uninterrupted run's losses. (A plain SIGTERM is a stop, not a preemption:
    docs/launching.md; the scancel tests cover it. submitit's local controller forwards only
    SIGTERM, so the warning goes to the tasks directly.)"""
    use_standin(monkeypatch)
    monkeypatch.setenv("MEGAVLA_STANDIN_STEP_S", "0.2")
    cfg = _cfg(tmp_path / "run", "train.steps=12", "launch.tasks_per_node=2")
    job = submit_run(cfg)
    wait_for_lines(tmp_path / "run" / "metrics.jsonl", 3, timeout_s=60)
    controller = job._process.pid
    for task in Path(f"/proc/{controller}/task/{controller}/children").read_text().split():
        os.kill(int(task), signal.SIGUSR2)
    assert job.results() == [0, 0]
    events = rundir.read_launch_record(tmp_path / "run")["events"]
    saved = [e["saved_step"] for e in events if e["event"] == "preempted"]
    resumed = [e["resume_step"] for e in events if e["event"] == "start" and e["attempt"] > 0]
    assert saved and resumed == saved and 0 < saved[0] < 12
    got = losses(tmp_path / "run")
    assert len(got) == 12  # each step logged once: the resumed job starts after the saved step
    from helpers.launch_standin import run
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MEGAVLA_STANDIN_STEP_S", "0")
    ref = _cfg(tmp_path / "ref", "train.steps=12")
    Path(ref.train.run_dir).mkdir(parents=True)
    assert run(ref) == 0
    assert got == pytest.approx(losses(tmp_path / "ref"), rel=1e-5)


def test_requeues_are_bounded(tmp_path, monkeypatch):
    use_standin(monkeypatch)
    cfg = _cfg(tmp_path / "run", "launch.max_requeues=1")
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True)
    from megavla.config import write_yaml
    from megavla.launch.task import TrainTask
    write_yaml(cfg, run_dir / "config.yaml")
    assert TrainTask(str(run_dir), requeues=0).checkpoint() is not None
    assert TrainTask(str(run_dir), requeues=1).checkpoint() is None
    assert rundir.read_launch_record(run_dir)["status"] == "failed"


def test_sweep_names_are_predictable_and_errors_name_the_run(tmp_path):
    names, _ = sweep.run_names({"model.preset": ["tiny", "small"], "data.mixture.human": [0.0, 0.5],
                                "train.seed": [0]})
    assert names[1] == "preset-tiny_human-0.5_seed-0" and len(names) == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: {train.lr: [0.1, -1.0]}\n")
    with pytest.raises(ConfigError, match=r"run lr--1.0: .*lr=-1.0 must be > 0"):
        sweep.expand(bad)
    bad.write_text("grid: {launch.nodes: [1, 2]}\n")
    with pytest.raises(ConfigError, match="launch settings and run_dir are per sweep"):
        sweep.expand(bad)


def test_local_sweep_runs_skips_finished_and_resumes_interrupted(tmp_path, monkeypatch, capsys):
    use_standin(monkeypatch)
    spec = tmp_path / "sweep.yaml"
    spec.write_text(json.dumps({"out_dir": str(tmp_path / "sw"), "grid": {"train.seed": [0, 1]},
                                "overrides": ["train.steps=4", "train.save_every=2",
                                              f"launch.entry={STANDIN_ENTRY}"]}))
    # seed-1 was interrupted at step 2 before: fake that state (config + checkpoint, no job alive).
    out_dir, runs = sweep.expand(spec)
    interrupted = Path(runs[1].cfg.train.run_dir)
    from megavla.launch.executor import prepare_run
    from helpers.launch_standin import save_checkpoint
    import torch
    prepare_run(runs[1].cfg)
    save_checkpoint(interrupted, 2, torch.zeros(8))
    rundir.update_launch_record(interrupted, status="requeued", executor="local", job_id="999999999")
    assert sweep.main([str(spec)]) == 0
    assert [json.loads(x)["step"] for x in (interrupted / "metrics.jsonl").read_text().splitlines()] == [3, 4]
    assert sweep.submit_sweep(spec) == []  # re-run: nothing to submit
    assert sweep.main(["status", str(out_dir)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:5] == ["RUN", "STATE", "STEP", "FLOW_LOSS", "TOTAL_LOSS"]
    assert [row.split()[:3] for row in table[1:]] == [["seed-0", "finished", "4/4"],
                                                      ["seed-1", "finished", "4/4"]]


@pytest.mark.parametrize("name, n_runs", [("transfer", 16), ("smoke", 4)])
def test_shipped_sweep_files_expand(name, n_runs, tmp_path):
    spec = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / f"{name}.yaml"
    sources = [f"data.sources.robot={tmp_path}/robot", f"data.sources.human={tmp_path}/human"]
    with pytest.raises(ConfigError, match="no source named"):  # sources are the user's to give
        sweep.expand(spec)
    out_dir, runs = sweep.expand(spec, sources)
    assert len(runs) == n_runs and len({r.cfg.train.run_dir for r in runs}) == n_runs
    assert all(Path(r.cfg.train.run_dir).parent == out_dir.resolve() for r in runs)
    if name == "transfer":
        first = runs[0].cfg
        assert (first.model.preset, first.data.diversity_fraction, first.data.mixture["human"],
                first.train.seed, first.train.steps) == ("tiny", 0.25, 0.0, 0, 2000)
        assert runs[0].name == "preset-tiny_diversity_fraction-0.25_human-0.0_seed-0"
