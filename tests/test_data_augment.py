"""Training image augmentation (openpi's recipe, on whole batches): shapes, ranges, determinism
under the torch RNG, wrist cameras colour-only, and validation / evaluation untouched."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megavla.config import Config
from megavla.data import augment
from megavla.data.augment import ImageAugmentation, augment_images, color_jitter, crop_rotate
from megavla.train.engine import DistInfo
from megavla.train.train_state import TrainState
from megavla.train.trainer import Trainer

CAMERAS = ["head", "left_wrist", "right_wrist"]


def images(b=4, r=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, len(CAMERAS), 3, r, r), dtype=torch.uint8, generator=g)


def test_shapes_dtype_and_ranges():
    x = images()
    torch.manual_seed(0)
    out = augment_images(x, CAMERAS)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert not torch.equal(out, x)
    f = x[:, 0].float() / 255.0
    torch.manual_seed(0)
    for y in (crop_rotate(f), color_jitter(f)):
        assert y.shape == f.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    # a channels-last view (what the loader's Batch holds) gives the same result
    view = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    torch.manual_seed(0)
    torch.testing.assert_close(augment_images(view, CAMERAS), out, atol=0, rtol=0)


def test_deterministic_under_the_torch_rng():
    x = images()
    torch.manual_seed(7)
    a = augment_images(x, CAMERAS)
    after_a = torch.rand(1)
    torch.manual_seed(7)
    b = augment_images(x, CAMERAS)
    assert torch.equal(a, b) and torch.equal(torch.rand(1), after_a)  # same draws, same count
    torch.manual_seed(8)
    assert not torch.equal(augment_images(x, CAMERAS), a)


def test_wrist_cameras_get_colour_jitter_only(monkeypatch):
    x = images()
    monkeypatch.setattr(augment, "JITTER_PROBABILITY", 0.0)  # geometry only
    torch.manual_seed(0)
    out = augment_images(x, CAMERAS)
    assert torch.equal(out[:, 1:], x[:, 1:])          # wrist: untouched geometry
    assert not torch.equal(out[:, 0], x[:, 0])        # head: cropped + rotated
    monkeypatch.setattr(augment, "JITTER_PROBABILITY", 1.0)
    # a uniform grey wrist image stays uniform (colour only, no geometry), but changes level
    grey = torch.full((2, 3, 3, 16, 16), 128, dtype=torch.uint8)
    out = augment_images(grey, CAMERAS)
    for cam in (1, 2):
        assert (out[:, cam] == out[:, cam, :, :1, :1]).all() and not torch.equal(out[:, cam], grey[:, cam])


def test_crop_rotate_is_a_small_zoom():
    """A horizontal ramp: after a 95 % crop and <= 5 deg rotation the centre pixel moves by at most
    ~(5 % crop offset + rotation) of the width, and the ramp keeps its direction."""
    r = 32
    ramp = torch.linspace(0, 1, r).view(1, 1, 1, r).expand(64, 3, r, r).contiguous()
    torch.manual_seed(0)
    out = crop_rotate(ramp)
    centre = out[:, 0, r // 2, r // 2]
    assert (centre - ramp[:, 0, r // 2, r // 2]).abs().max() < 0.1
    assert bool((out[:, 0, r // 2, -4] > out[:, 0, r // 2, 3]).all())


class FakeEngine:
    """Records the batches the trainer hands to the model."""

    def __init__(self):
        self.seen, self.module, self.param = [], torch.nn.Linear(1, 1), torch.nn.Parameter(torch.zeros(()))
        self.skipped_steps = 0     # DeepSpeed's count of updates skipped for a non-finite gradient norm

    def is_gradient_accumulation_boundary(self):
        return True

    def gradient_accumulation_steps(self):
        return 1

    def train(self):
        pass

    def eval(self):
        pass

    def __call__(self, batch):
        self.seen.append(batch.images.clone())
        return {"loss": (self.param * 0.0).sum()}

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass

    def get_global_grad_norm(self):
        return None


class FakeMetrics:
    writer = None    # no tensorboard: the trainer draws no validation figures

    def add(self, values):
        pass

    def add_sums(self, values):
        pass

    def reduce(self):
        return {}

    def write(self, *args, **kwargs):
        pass


@pytest.mark.parametrize("enabled", [True, False])
def test_trainer_augments_training_batches_only(enabled, tmp_path):
    from megavla.model.synthetic import random_batch
    from megavla.config.model import ModelConfig
    cfg = Config()
    cfg.data.augment_images = enabled
    cfg.train.run_dir = str(tmp_path)
    batch = random_batch(ModelConfig(preset="tiny", action_dim=8, state_dim=8), num_cameras=3)
    engine = FakeEngine()
    trainer = Trainer(cfg, engine, [batch], DistInfo(0, 1, 0, torch.device("cpu")), TrainState(),
                      val_loader_factory=lambda: [batch])
    trainer.train_step()
    assert torch.equal(engine.seen[0], batch.images) != enabled
    trainer.validate(FakeMetrics())
    assert torch.equal(engine.seen[-1], batch.images)  # validation: as recorded
    # and the policy used in evaluation builds its batches without the trainer (no augmentation)
    import megavla.eval.policy as policy
    assert "augment" not in Path(policy.__file__).read_text()
