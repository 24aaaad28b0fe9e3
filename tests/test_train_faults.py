"""Faults in training, in-process at world size 1 with the toy model (tests/helpers/toy_training.py):
a used run dir is never silently restarted, a damaged checkpoint is skipped naming the file, non-finite steps
are skipped and counted and stop the run after max_nonfinite_steps, a changed batch on resume is
reported, a full disk is reported with sizes and leaves earlier checkpoints intact."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from megavla.config import load_config
from megavla.train import checkpoint as ckpt
from megavla.train.entry import run
from megavla.train.errors import CheckpointError, NonFiniteError, ResumeError
from megavla.train.export import consolidated_state_dict

from helpers.toy_training import toy_loader_factory, toy_model_factory

KW = dict(model_factory=toy_model_factory, loader_factory=toy_loader_factory)


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)   # run() sets them for a 1-process group; undone after


def cfg(run_dir, *extra):
    return load_config(None, [f"train.run_dir={run_dir}", "train.steps=6", "train.zero_stage=2",
                              "train.precision=fp32", "train.lr=0.01", "train.warmup_steps=1",
                              "train.log_every=1", "train.save_every=2", "train.keep_last=5",
                              "train.progress=false", "train.tensorboard=false", "data.batch_size=4", *extra])


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_used_run_dir_needs_resume_or_overwrite_and_damage_falls_back(tmp_path, caplog):
    run_dir = tmp_path / "run"
    assert run(cfg(run_dir, "train.max_steps_per_run=4"), **KW) == 0
    # Item 3: no --resume on a run dir with checkpoints and metrics: an error, nothing overwritten.
    with pytest.raises(ResumeError, match="already holds a run"):
        run(cfg(run_dir), **KW)
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3, 4]
    # Item 4: the newest checkpoint lost a shard: --resume auto falls back to step 2, naming the file.
    shard = run_dir / "checkpoints" / "step_000004" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        assert run(cfg(run_dir), resume="auto", **KW) == 0
    assert "damaged checkpoint skipped" in caplog.text and "mp_rank_00_model_states.pt has 1000 bytes" in caplog.text
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3, 4, 3, 4, 5, 6]
    # --overwrite starts over: the old curve and checkpoints are gone, one clean curve remains.
    assert run(cfg(run_dir), overwrite=True, **KW) == 0
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3, 4, 5, 6]


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch, caplog):
    # Item 7: NaN loss at forward calls 3 and 4 (optimizer steps 3, 4): both skipped, training goes on.
    monkeypatch.setenv("TOY_NAN_AT_CALLS", "3,4")
    run_dir = tmp_path / "run"
    assert run(cfg(run_dir), **KW) == 0
    recs = records(run_dir)
    assert [r["train/skipped_nonfinite"] for r in recs] == [0, 0, 1, 2, 2, 2]
    assert all(math.isfinite(r["loss/total"]) for r in recs if "loss/total" in r)
    assert "loss/total" not in recs[2] and "loss/total" not in recs[3]     # a NaN never enters the mean
    weights = consolidated_state_dict(run_dir / "checkpoints" / "step_000006")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert ckpt.read_trainer_state(run_dir / "checkpoints" / "step_000006")["skipped_nonfinite"] == 2
    # Every step non-finite from step 3 on: stopped after max_nonfinite_steps=2 in a row, no save.
    monkeypatch.setenv("TOY_NAN_AT_CALLS", ",".join(str(i) for i in range(3, 20)))
    other = tmp_path / "bad"
    with pytest.raises(NonFiniteError, match=r"2 optimizer steps in a row \(up to step 4\)"):
        run(cfg(other, "train.max_nonfinite_steps=2"), **KW)
    assert [p.name for p in ckpt.list_checkpoints(other / "checkpoints")] == ["step_000002"]


def test_nonfinite_gradients_skipped_under_zero0(tmp_path, monkeypatch):
    """ZeRO-0 has no DeepSpeed overflow check: the trainer drops the NaN gradients itself."""
    monkeypatch.setenv("TOY_NAN_AT_CALLS", "2")
    run_dir = tmp_path / "run"
    assert run(cfg(run_dir, "train.zero_stage=0", "train.steps=3"), **KW) == 0
    assert records(run_dir)[-1]["train/skipped_nonfinite"] == 1
    weights = consolidated_state_dict(run_dir / "checkpoints" / "step_000003")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_changed_batch_on_resume_is_warned_and_recorded(tmp_path, caplog):
    # Item 10: global batch 4 -> 8 (grad accum 1 -> 2) at the resume.
    run_dir = tmp_path / "run"
    assert run(cfg(run_dir, "train.max_steps_per_run=2"), **KW) == 0
    with caplog.at_level(logging.WARNING):
        assert run(cfg(run_dir, "train.global_batch_size=8", "train.steps=3"), resume="auto", **KW) == 0
    assert "changes the batch: grad_accum 1 -> 2, global_batch_size 4 -> 8" in caplog.text
    event = [r for r in records(run_dir) if r.get("event")]
    assert event == [{"step": 2, "event": "batch_changed", "grad_accum": [1, 2], "global_batch_size": [4, 8]}]


def test_full_disk_is_named_and_earlier_checkpoints_stay(tmp_path, monkeypatch):
    # Item 6: the save of step 4 hits ENOSPC the way torch reports it.
    run_dir = tmp_path / "run"
    real_save = ckpt.write_rank_state

    def full_disk(tmp, rank, state):
        if tmp.name.endswith("step_000004"):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0: "
                               "basic_ios::clear: iostream error")
        real_save(tmp, rank, state)
    monkeypatch.setattr(ckpt, "write_rank_state", full_disk)
    with pytest.raises(CheckpointError) as e:
        run(cfg(run_dir), **KW)
    msg = str(e.value)
    assert "saving checkpoint step_000004" in msg and "No space left on device" in msg
    assert "the last checkpoint took" in msg and "MB free now" in msg
    assert [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")] == ["step_000002"]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    # Too little free space for another checkpoint of the same size: refused before writing.
    monkeypatch.setattr(ckpt, "write_rank_state", real_save)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(CheckpointError, match="not enough free space .* 0 MB are free"):
        run(cfg(run_dir), resume="auto", **KW)
