"""Episode format v1 (axis-angle state) sets are refused with the fix, and convert exactly to v2."""
import json

import numpy as np
import pytest

from megavla.data_shards import hands
from megavla.data.cli import main as data_main
from megavla.data_shards import format as fmt
from megavla.data_shards import writer as writer_mod
from megavla.data_shards.manifest import ManifestError, load_manifest
from megavla.data_shards.synth import generate_episode
from megavla.data_shards.verify import iter_tar_samples


def _write_v1_set(out, monkeypatch):
    """A set exactly as the v1 code wrote it: axis-angle state, version 1 in meta and manifest."""
    eps = [generate_episode(emb, 0, 3, 0, image_size=16, cameras=("head",)) for emb in ("robot/arm", "human/ego")]
    for ep in eps:
        arms = ep.state.shape[1] // hands.ARM_STATE_DIM
        poses = hands.state_to_pose(ep.state.reshape(len(ep.state), arms, 10)[..., :9])
        grip = ep.state.reshape(len(ep.state), arms, 10)[..., 9:]
        ep.state = np.concatenate([hands.pose_to_vec(poses), grip], -1).reshape(len(ep.state), -1).astype(np.float32)
    monkeypatch.setattr(fmt, "FORMAT_VERSION", 1)
    monkeypatch.setattr(writer_mod, "FORMAT_VERSION", 1)
    with writer_mod.ShardSetWriter(out, generator={"test": "v1"}) as w:
        for ep in eps:
            w.write(ep)
    monkeypatch.undo()
    return eps


def test_v1_set_is_refused_then_converted(tmp_path, monkeypatch, capsys):
    v1 = tmp_path / "v1"
    eps = _write_v1_set(v1, monkeypatch)
    with pytest.raises(ManifestError, match="megavla data convert"):
        load_manifest(v1)
    sample = next(iter_tar_samples(next(v1.glob("*.tar")), []))
    with pytest.raises(fmt.EpisodeFormatError, match="format_version=1"):
        fmt.sample_to_episode(sample)
    assert data_main(["convert", str(v1), "--out", str(tmp_path / "v2")]) == 0
    assert "episode format v2" in capsys.readouterr().out
    manifest = load_manifest(tmp_path / "v2")
    assert manifest["generator"]["converted_from"]["episode_format_version"] == 1
    converted = [fmt.sample_to_episode(s) for s in iter_tar_samples(next((tmp_path / "v2").glob("*.tar")), [])]
    assert len(converted) == 2
    for old, new in zip(eps, converted):
        fresh = generate_episode(old.embodiment, 0, 3, 0, image_size=16, cameras=("head",))
        np.testing.assert_allclose(new.state, fresh.state, atol=1e-5)  # = what v2 code writes
        np.testing.assert_array_equal(new.actions, fresh.actions)
        assert json.loads((tmp_path / "v2" / "norm_stats.json").read_text())[old.embodiment]
    # Converting a v2 set, or into the source directory, is refused.
    assert data_main(["convert", str(tmp_path / "v2"), "--out", str(tmp_path / "v3")]) == 2
