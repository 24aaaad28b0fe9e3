"""The reader on real parts: mini-world episodes, the shard writer's sets, trained tokenizers."""
from __future__ import annotations

import itertools

import pytest
import torch

from megavla.config.data import DataConfig
from megavla.data.pipeline import build_loader


@pytest.fixture(scope="module")
def synth_sets(tmp_path_factory):
    synth = pytest.importorskip("megavla.data_shards.synth")
    writer = pytest.importorskip("megavla.data_shards.writer")
    root = tmp_path_factory.mktemp("synth")
    sets = {}
    for family, embodiment in (("robot", "robot/arm"), ("human", "human/ego")):
        with writer.ShardSetWriter(root / family, target_shard_bytes=64 << 10) as w:
            for scene, task in itertools.product(range(2), range(2)):
                w.write(synth.generate_episode(embodiment, scene, task, 0, image_size=32))
        sets[family] = str(root / family)
    return sets


def test_reader_on_writer_output_with_trained_tokenizers(synth_sets, tmp_path):
    pair = pytest.importorskip("megavla.tokenizers.pair")
    text_tok, fast_tok = pair.train_tokenizers(list(synth_sets.values()), tmp_path / "tok", text_vocab=300,
                                               fast_vocab=300, chunk_length=5, chunk_stride=2)
    cfg = DataConfig(sources=synth_sets, mixture={"robot": 0.5, "human": 0.5}, image_size=32, batch_size=8,
                     num_workers=0, chunk_length=5, shuffle_buffer=16, samples_per_episode=2)
    loader = build_loader(cfg, text_tok, fast_tok)
    batches = list(itertools.islice(loader, 4))
    b = batches[0]
    assert b.images.shape == (8, 3, 3, 32, 32) and b.actions.shape == (8, 5, 32)
    assert b.text_mask.any(1).all() and b.fast_mask.any(1).all() and b.subtask_mask.any(1).all()
    assert b.text_tokens.max() < text_tok.vocab_size and b.fast_tokens.max() < fast_tok.vocab_size
    embodiments = torch.cat([x.embodiment for x in batches])
    assert set(embodiments.tolist()) == {0, 1}
    for x in batches:
        human = x.embodiment == 1
        # Human data: head camera only; its gripper dims (inside the native dims) are unsupervised.
        assert not x.image_mask[human, 1:].any() and x.image_mask[~human].all()
        for row in x.action_dim_mask[human]:
            native = int(row.nonzero().max()) + 1
            assert not row[:native].all()
        assert torch.isfinite(x.actions).all() and torch.isfinite(x.state).all()
    assert loader.skip_counts()["bad_sample"] == 0
