"""The launcher tests' stand-in trainer (tests/helpers/launch_standin.py) keeps the trainer's contract:
resume="auto" continues the same loss curve."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.launch_standin import run

# The stand-in itself must behave like the trainer contract, or the launcher tests prove nothing.
def test_standin_resume_continues_the_same_curve(tmp_path, monkeypatch):
    from megavla.config import load_config
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    straight = load_config(overrides=[f"train.run_dir={tmp_path / 'a'}", "train.steps=6"])
    split = load_config(overrides=[f"train.run_dir={tmp_path / 'b'}", "train.steps=6",
                                   "train.max_steps_per_run=3"])
    for c in (straight, split):
        Path(c.train.run_dir).mkdir(parents=True)
    assert run(straight) == 0
    assert run(split, resume="auto") == 0 and run(split, resume="auto") == 0

    def losses(d):
        return [json.loads(line)["loss"] for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    assert len(losses(straight.train.run_dir)) == 6
    assert losses(split.train.run_dir) == pytest.approx(losses(straight.train.run_dir), abs=0)
    assert losses(straight.train.run_dir)[-1] < losses(straight.train.run_dir)[0]

