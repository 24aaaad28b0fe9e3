"""A newcomer's first runs (issue 24, item 5): mistakes are one line and exit 2 before any process;
no command writes into another's output; a hand-run `megavla train` ends with a summary; the metric
names are documented from the code; in-process inference uses one CPU thread unless told otherwise."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# ---- 1. nothing to train on: one line, exit 2, nothing written ----------------------------------
def test_missing_sources_and_run_dir_are_one_line_before_any_process(tmp_path, capsys, monkeypatch):
    from megavla.train import cli as train_cli

    def no_launch(*args, **kwargs):
        raise AssertionError("a worker process was started for a config that cannot train")
    monkeypatch.setattr(train_cli, "launch_local", no_launch)
    monkeypatch.chdir(tmp_path)
    # Before: passed the checks, built the engine on 2 ranks, died with a per-rank traceback, exit 1,
    # after creating runs/demo (the demo's own output directory).
    assert train_cli.main([str(DEMO_CONFIG), "--nproc", "2"]) == 2
    assert "train.run_dir is not set" in _one_line_error(capsys)
    run_dir = tmp_path / "runs" / "mine"
    assert train_cli.main([str(DEMO_CONFIG), f"train.run_dir={run_dir}", "--nproc", "2"]) == 2
    err = _one_line_error(capsys)
    assert "data.sources is empty" in err and "data.sources.robot=" in err
    assert not (tmp_path / "runs").exists()          # no run dir, no runs/demo


def test_launch_refuses_the_same_configs_before_submitting(tmp_path):
    from megavla.config import load_config
    from megavla.launch.executor import LaunchError, check_run, prepare_run
    from megavla.config import ConfigError
    cfg = load_config(DEMO_CONFIG, [f"train.run_dir={tmp_path / 'run'}"])
    with pytest.raises(LaunchError, match="data.sources is empty"):
        check_run(cfg, None)
    with pytest.raises(ConfigError, match="train.run_dir is not set"):
        prepare_run(load_config(DEMO_CONFIG))
    assert not (tmp_path / "run").exists()


# ---- 2. no default run dir; demo and train cannot clobber each other ----------------------------
def test_demo_and_train_never_write_into_each_others_output(tmp_path, capsys, monkeypatch):
    import yaml

    from megavla import demo, demo_output
    from megavla.config import load_config
    from megavla.train import cli as train_cli
    assert "run_dir" not in yaml.safe_load(DEMO_CONFIG.read_text())["train"]
    assert load_config(DEMO_CONFIG).train.run_dir is None            # no default to share
    monkeypatch.setattr(train_cli, "launch_local", lambda *a, **k: pytest.fail("launched"))

    out = tmp_path / "demo"
    demo.claim_output_dir(out)
    assert demo_output.demo_output_holding(out / "run") == out.resolve()
    for inside in (out, out / "run", out / "shards" / "x"):   # train refuses the demo's dirs
        assert train_cli.main([str(DEMO_CONFIG), f"train.run_dir={inside}", "--nproc", "2"]) == 2
        assert "output directory of `megavla demo`" in _one_line_error(capsys)
    assert sorted(p.name for p in out.iterdir()) == [demo_output.MARKER_FILE]   # nothing written there

    run = tmp_path / "run"                # a training run's dir: the demo refuses it as --out
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    assert demo.main(["--out", str(run)]) == 2
    assert "holds files the demo did not write (checkpoints, metrics.jsonl)" in _one_line_error(capsys)
    assert not (run / demo_output.MARKER_FILE).exists() and (run / "metrics.jsonl").read_text() == '{"step": 1}\n'

    legacy = tmp_path / "old_demo"        # written by a demo from before the marker: adopted
    (legacy / "shards").mkdir(parents=True)
    (legacy / "run").mkdir()
    demo.claim_output_dir(legacy)
    assert (legacy / demo_output.MARKER_FILE).is_file()


# ---- 3. objectives that need tokenizers, without train.tokenizer_dir ----------------------------
def test_missing_tokenizers_are_refused_when_an_objective_needs_them(tmp_path, capsys, monkeypatch):
    from megavla.config import load_config
    from megavla.train import cli as train_cli, preflight
    monkeypatch.setattr(train_cli, "launch_local", lambda *a, **k: pytest.fail("launched"))
    (tmp_path / "robot").mkdir()
    sources = [f"data.sources.robot={tmp_path / 'robot'}", f"train.run_dir={tmp_path / 'run'}"]
    monkeypatch.setattr(train_cli, "check_launchable", lambda cfg, nproc: None)  # an empty dir is no shard set
    # Before: trained with loss/subtask 0.0 and a FAST loss on its end marker only, and said nothing.
    assert train_cli.main([str(DEMO_CONFIG), *sources, "--nproc", "2"]) == 2
    err = _one_line_error(capsys)
    for needle in ("train.tokenizer_dir is not set", "subtask loss (model.subtask_weight=1",
                   "FAST loss (model.fast_weight=1", "action_conditioning=subtask", "megavla tokenizer train"):
        assert needle in err, needle
    only_fast = load_config(DEMO_CONFIG, sources + ["model.subtask_weight=0", "model.action_conditioning=instruction"])
    assert [n.split(" (")[0] for n in preflight.tokenizer_dependents(only_fast)] == ["the FAST loss"]
    flow_only = load_config(DEMO_CONFIG, sources + ["model.subtask_weight=0", "model.fast_weight=0",
                                                    "model.action_conditioning=instruction"])
    assert "reads no instruction text" in preflight.check_trainable(flow_only)   # runs, with a warning
    assert not (tmp_path / "run").exists()


# ---- 4. in-process inference threads --------------------------------------------------------------
def test_inference_threads_rule(monkeypatch):
    from megavla.eval.threads import inference_threads, inference_threads_scope
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert inference_threads() == 1                  # the default on a CPU
    assert inference_threads(3) == 3 and inference_threads(0) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert inference_threads() is None               # the user's setting stays
    with pytest.raises(ValueError, match="must be >= 0"):
        inference_threads(-1)
    before = torch.get_num_threads()
    with inference_threads_scope(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before


# ---- 5. one overwrite rule -------------------------------------------------------------------------
def test_writers_refuse_an_existing_output_without_overwrite(tmp_path, capsys):
    from megavla.eval.cli import main as experiment
    from megavla.tokenizers.cli import main as tokenizer
    shards, out = tmp_path / "shards", tmp_path / "tok"
    shards.mkdir()
    out.mkdir()
    (out / "text.model").write_bytes(b"theirs")
    # Before: `tokenizer train` replaced text.model etc. silently.
    assert tokenizer(["train", "--shards", str(shards), "--out", str(out)]) == 2
    assert "already holds files (text.model); pass --overwrite" in _one_line_error(capsys)
    assert (out / "text.model").read_bytes() == b"theirs"
    result = tmp_path / "result.json"
    result.write_text("{}")                  # refused before the checkpoint is even looked at
    assert experiment(["closed-loop", str(tmp_path / "no_such_ckpt"), "--out", str(result)]) == 2
    assert "already holds a closed-loop result" in capsys.readouterr().err
    probe_out = tmp_path / "probe"
    probe_out.mkdir()
    (probe_out / "notes.txt").write_text("mine")      # not a probe file: the probe may write beside it
    (probe_out / "results_probe.json").write_text("{}")
    assert experiment(["probe", str(tmp_path / "no_such_ckpt"), "--out", str(probe_out)]) == 2
    assert "already holds probe results (results_probe.json)" in capsys.readouterr().err
    helps = {}
    for command in (["data", "import", "lerobot", "--help"], ["tokenizer", "train", "--help"],
                    ["experiment", "closed-loop", "--help"], ["experiment", "probe", "--help"]):
        done = subprocess.run([sys.executable, "-m", "megavla.cli", *command], capture_output=True, text=True)
        helps[command[0]] = " ".join(done.stdout.split())
        assert "--overwrite" in done.stdout, command
    assert "continues an unfinished import (resumable by design)" in helps["data"]


# ---- 6 + 7 + 4 + 5: a real hand-run `megavla train` ------------------------------------------------
def test_hand_run_train_ends_with_a_summary_and_writes_only_documented_metrics(tiny_synth_data, tmp_path):
    from megavla.train.metrics import documented_metric
    run_dir = tmp_path / "run"
    shards = tiny_synth_data / "shards"
    argv = [str(DEMO_CONFIG), f"data.sources.robot={shards / 'robot'}", f"data.sources.human={shards / 'human'}",
            f"data.val_sources.robot={shards / 'robot'}", f"train.tokenizer_dir={tiny_synth_data / 'tok'}",
            f"train.run_dir={run_dir}", "train.steps=4", "train.log_every=1", "train.val_every=2",
            "train.val_batches=1", "train.warmup_steps=1", "train.progress=false", "data.num_workers=0",
            "data.batch_size=4", "--nproc", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "megavla.cli", "train", *argv], capture_output=True, text=True,
                          timeout=400, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    # Before: the last line was the rank-0 log "done at step 4: tensorboard logs in ...", no losses.
    out = done.stdout
    assert "training done:" in out
    assert "flow loss " in out and "(first 2 logs) -> " in out and "(last 2)" in out, out
    assert f"steps:           4 (loss logged at 4 steps, 1 -> 4)" in out, out
    assert f"checkpoints:     {run_dir / 'checkpoints'}  (latest: step_000004)" in out, out
    assert f"tensorboard:     tensorboard --logdir {run_dir / 'tb'}" in out, out

    keys = set()
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "event" not in rec:
            keys |= set(rec) - {"step"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(str(run_dir / "tb"))
    tb.Reload()
    assert set(tb.Tags()["scalars"]) == keys            # the same names in both places
    # Validation draws predicted vs true action chunks (val_figures.py) at each val_every step.
    images = tb.Images("val/action_chunks")
    assert [e.step for e in images] == [2, 4] and documented_metric("val/action_chunks") == "val/action_chunks"
    from PIL import Image
    import io
    assert min(Image.open(io.BytesIO(images[-1].encoded_image_string)).size) > 100
    undocumented = sorted(k for k in keys if documented_metric(k) is None)
    assert not undocumented, f"add these to METRIC_CATALOGUE (megavla/train/metrics.py): {undocumented}"
    for expected in ("loss/flow", "loss/fast", "loss/subtask", "flow/robot_arm", "flow/human_ego",
                     "val/loss/flow", "data/samples_read", "launch/first_step_s"):
        assert expected in keys, expected

    # The same run, loaded in process: one CPU thread unless the user set OMP_NUM_THREADS.
    script = ("import megavla, torch; megavla.load_policy(%r); print(torch.get_num_threads())" % str(run_dir))
    env.pop("OMP_NUM_THREADS", None)
    threads = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert threads.returncode == 0, threads.stderr[-2000:]
    assert threads.stdout.split()[-1] == "1"
    threads = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             env={**env, "OMP_NUM_THREADS": "2"}, timeout=120)
    assert threads.stdout.split()[-1] == "2"

    # `tokenizer train` into its own existing output: refused, then replaced with --overwrite.
    import shutil
    own_tok = shutil.copytree(tiny_synth_data / "tok", tmp_path / "tok")      # the shared set stays as it is
    tok = ["tokenizer", "train", "--shards", str(shards), "--out", str(own_tok)]
    again = subprocess.run([sys.executable, "-m", "megavla.cli", *tok], capture_output=True, text=True)
    assert again.returncode == 2 and "pass --overwrite" in again.stderr
    again = subprocess.run([sys.executable, "-m", "megavla.cli", *tok, "--overwrite"], capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]


# ---- 7. the metric reference cannot drift ------------------------------------------------------------
def test_metrics_doc_is_generated_from_the_catalogue():
    import re

    from megavla.train.metrics import LAUNCH_PHASES, documented_metric, metrics_markdown
    assert (REPO / "docs" / "metrics.md").read_text() == metrics_markdown(), \
        "regenerate: python -m megavla.train.metrics > docs/metrics.md"
    assert "docs/metrics.md" in (REPO / "README.md").read_text()
    marks = re.findall(r'\.mark\("(\w+)"\)',
                       (REPO / "megavla/train/entry.py").read_text() + (REPO / "megavla/train/trainer.py").read_text())
    assert tuple(marks) == LAUNCH_PHASES
    assert documented_metric("data/skipped_bad_image") == "data/skipped_<reason>"
    assert documented_metric("val/subtask/robot_joint") == "val/<loss key>"
    assert documented_metric("val/optim/lr") is None and documented_metric("flow/emb0") is None
