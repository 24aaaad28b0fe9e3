"""Host syncs in the training hot path: with the real tiny VLA, a training step of our code (trainer,
model, kernels) converts no tensor to a host value; the metrics are read once per log interval.

On a GPU every tensor -> Python conversion (.item(), float(), bool(), .tolist(), .cpu()) waits for
the device. On this CPU box they are counted by patching those Tensor methods and attributing each
call to the file that made it. (Data-dependent shapes -- vision's present-camera selection -- sync
inside torch and are not seen here; `torch.cuda.set_sync_debug_mode` shows them on a GPU.)
"""
from __future__ import annotations

import collections
import sys
from pathlib import Path

import pytest
import torch

import megavla
from megavla.config import load_config
from megavla.model.synthetic import random_batch
from megavla.train import trainer as trainer_mod
from megavla.train.entry import run

REPO = str(Path(megavla.__file__).resolve().parents[1])
DEEPSPEED_SYNCS_PER_STEP = {0: 0, 2: 3}   # DeepSpeed 0.19.8, fp32, one optimizer step
# The trainer's non-finite gradient check under ZeRO-0, where DeepSpeed has none (ZeRO-1/2/3 do the
# same check inside DeepSpeed: the syncs above): one read per optimizer step.
NONFINITE_GUARD_SYNCS_PER_STEP = {0: 1, 2: 0}
CONVERSIONS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "__index__")


class SyncCounter:
    """Counts tensor -> host conversions by the calling file while `active`."""

    def __init__(self, monkeypatch):
        self.active = False
        self.calls: collections.Counter = collections.Counter()
        for name in CONVERSIONS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        counter = self

        def counted(tensor, *args, **kwargs):
            if counter.active:
                caller = sys._getframe(1)
                counter.calls[(caller.f_code.co_filename, caller.f_lineno, name)] += 1
            return original(tensor, *args, **kwargs)
        return counted

    def syncs(self) -> dict:
        """Every counted call but torch AdamW's per-parameter step counters: with the CPU optimizer
        they are CPU tensors read by `_get_value` (host memory, not a device sync); on a GPU the
        trainer's fused AdamW keeps them on the device and never reads them."""
        return {k: v for k, v in self.calls.items() if not k[0].endswith("torch/optim/optimizer.py")}


class SyntheticLoader:
    """Batches made up front (a loader's own CPU work is not the trainer's hot path)."""

    def __init__(self, cfg):
        # data.cameras' default count (3): the trainer's image augmentation runs and is counted too
        self.batches = [random_batch(cfg, batch_size=2, num_cameras=3, seed=i) for i in range(4)]

    def __iter__(self):
        while True:
            yield from self.batches


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_train_step_forces_no_host_sync(tmp_path, monkeypatch, zero_stage):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(None, [f"train.run_dir={tmp_path / 'run'}", "train.steps=6", "train.log_every=3",
                             f"train.zero_stage={zero_stage}", "train.precision=fp32", "train.grad_accum=2",
                             "train.progress=false", "train.tensorboard=false", "model.preset=tiny",
                             "model.kernels=torch", "data.batch_size=2"])
    counter = SyncCounter(monkeypatch)
    per_step, per_read = [], []
    step, read = trainer_mod.Trainer.train_step, trainer_mod.Trainer._read_window

    def counted(method, record):
        def wrapper(self):
            counter.calls.clear()
            counter.active = True
            try:
                return method(self)
            finally:
                counter.active = False
                record.append(counter.syncs())
        return wrapper

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", counted(step, per_step))
    monkeypatch.setattr(trainer_mod.Trainer, "_read_window", counted(read, per_read))
    assert run(cfg, loader_factory=lambda c, *a, **k: SyntheticLoader(c.model)) == 0
    assert len(per_step) == 6 and len(per_read) == 2
    for syncs in per_step:
        ours = {k: v for k, v in syncs.items() if "/deepspeed/" not in k[0]}
        guard = sum(v for k, v in ours.items() if k[0].endswith("megavla/train/trainer.py") and k[2] == "__bool__")
        assert guard == NONFINITE_GUARD_SYNCS_PER_STEP[zero_stage], ours
        ours = {k: v for k, v in ours.items() if not (k[0].endswith("megavla/train/trainer.py") and k[2] == "__bool__")}
        assert ours == {}, f"host syncs in a train step (file, line, method): {ours}"
        # DeepSpeed's own (ZeRO-1/2 read the grad norm's finiteness: is_invalid_grad_norm): measured
        # counts, so that an upgrade that adds more shows here
        deepspeed = sum(v for k, v in syncs.items() if "/deepspeed/" in k[0])
        assert deepspeed <= DEEPSPEED_SYNCS_PER_STEP[zero_stage], syncs
    for syncs in per_read:   # one transfer of all metric sums per log interval
        assert sum(syncs.values()) == 1, syncs
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 2 and '"perf/tflops_per_s"' in records[-1] and '"flow/robot_arm"' in records[-1]
