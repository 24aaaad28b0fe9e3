"""Experiment specs (megavla.eval.experiments) load through the run config's core: the same dotted
overrides, unknown-key errors and messages, and their run config is checked by the run config's
rules when the spec loads, before any data is written."""
from __future__ import annotations

import pytest

from megavla.config import Config, ConfigError, build
from megavla.eval import experiments as ex


@pytest.mark.parametrize("preset", ["toy", "mini", "gpu"])
def test_every_shipped_preset_loads_and_its_run_config_is_a_valid_run_config(preset):
    spec = ex.load_spec(preset)
    data = {"robot": "/r", "human": "/h", "tokenizers": "/t"}
    cfg = build(Config, ex.run_config(spec, data, []))
    assert cfg.data.sources == {"robot": "/r", "human": "/h"}


@pytest.mark.parametrize("override, message", [
    ("world.scenez=3", "unknown config key 'world.scenez'; valid keys: .* Did you mean 'scenes'?"),
    ("eval.alpha=2", "eval.alpha=2.0 must be in \\(0, 1\\)"),
    ("pretrain_steps=many", "pretrain_steps: expected an integer, got 'many'"),
    ("train_config.train.lrr=1", "^train_config \\+ overrides \\(every run's config\\): unknown config key "
                                 "'train.lrr'; .* Did you mean 'lr'\\?"),
    ("overrides=[data.chunk_lenght=5]", "unknown config key 'data.chunk_lenght'; .* Did you mean 'chunk_length'"),
    ("overrides=[train.lr]", "override 'train.lr' must look like dotted.key=value"),
    ("train_config.model.preset=small", "model.image_size=224 \\(preset small\\) but data.image_size=32: .* "
                                        "set data.image_size=224"),
])
def test_spec_errors_name_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        ex.load_spec("toy", [override])


def test_an_unknown_preset_names_the_shipped_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"^experiment preset 'nope': no such file; presets are \['gpu', 'mini', 'toy'\]$"):
        ex.load_spec("nope")
    path = tmp_path / "mine.yaml"
    path.write_text("world: {scenes: 3}\npretrain_steps: 5\n")
    spec = ex.load_spec(path, ["finetune_steps=4"])
    assert (spec.world.scenes, spec.pretrain_steps, spec.finetune_steps) == (3, 5, 4)
