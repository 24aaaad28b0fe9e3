"""TrainState (megavla/train/train_state.py): the JSON a checkpoint holds besides weights and optimizer.
The on-disk keys stay those of format 1 (checkpoints written before the TrainState object resume
after it: the exact-resume tests in test_train_resume.py run through it), files from before a key
existed are read with its old meaning, and a newer format is refused by name."""
from __future__ import annotations

import json

import pytest

from megavla.train.errors import ResumeError
from megavla.train.train_state import STATE_FORMAT, TrainState, batch_layout

# trainer_state.json's keys as checkpoints have been written since format 1 (readers: export,
# evaluation, `megavla sweep status`, resume)
FORMAT_1_KEYS = ["format", "step", "world_size", "reason", "zero_stage", "precision", "batch",
                 "skipped_nonfinite", "config", "code_version", "time"]
CONFIG = {"data": {"batch_size": 4}, "train": {"grad_accum": 1, "global_batch_size": 16}}


def test_state_dict_keeps_the_format_1_keys_and_round_trips(tmp_path):
    state = TrainState(step=7, skipped_nonfinite=2, batch=batch_layout(4, 2, 2), world_size=2, zero_stage=1,
                       precision="bf16", config=CONFIG, code_version="abc")
    saved = json.loads(json.dumps(state.state_dict("periodic")))
    assert list(saved) == FORMAT_1_KEYS and saved["format"] == STATE_FORMAT == 1 and saved["reason"] == "periodic"
    (tmp_path / "trainer_state.json").write_text(json.dumps(saved))
    state.rng, state.loader = {"torch": "AA=="}, {"index": 3}
    (tmp_path / "rank_00001.json").write_text(json.dumps(state.rank_state_dict(1)))
    back = TrainState.read(tmp_path, rank=1)
    assert back == state
    assert not TrainState.read(tmp_path, rank=0).has_rank_state      # no file for rank 0
    assert back.layout_differs(2, 1) is False and back.layout_differs(1, 1) and back.layout_differs(2, 2)


def test_older_files_read_with_their_old_meaning():
    old = {"step": 5, "world_size": 2, "zero_stage": 2, "precision": "fp32", "config": CONFIG}  # no batch, no counts
    state = TrainState()
    state.load_state_dict(old)
    # global 16 = micro 4 x world 2 x accumulation 2, derived from the saved config
    assert state.batch == batch_layout(4, 2, 2) and state.skipped_nonfinite == 0 and state.step == 5


def test_a_newer_format_is_refused_by_name():
    with pytest.raises(ResumeError, match="format 2 was written by a newer MegaVLA"):
        TrainState().load_state_dict({"format": 2, "step": 1, "world_size": 1, "zero_stage": 0})
