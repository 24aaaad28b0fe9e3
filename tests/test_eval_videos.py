"""Rollout videos (issue 28 item 1): `megavla experiment closed-loop --videos N` writes playable H.264
MP4s of the first N episodes per combo beside the result, frame i showing the world after step i as
the policy's cameras render it; the experiments' per-outcome selection keeps k successes + k failures."""
from __future__ import annotations

import json

import av
import numpy as np
import pytest

from megavla.data_shards.miniworld import MiniWorld
from megavla.eval import cli, closed_loop
from megavla.eval.videos import BAND, MIN_TILE, VideoRecorder
from megavla.serving.random_export import write_random_export


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return write_random_export(tmp_path_factory.mktemp("export"))


def _decode(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)]


ARGS = ["--combos", "0:0,1:1", "--episodes-per-combo", "3", "--max-steps", "8", "--execute-k", "3",
        "--flow-steps", "2"]


def test_closed_loop_videos_are_playable_and_show_what_the_policy_saw(export, tmp_path, capsys):
    out = tmp_path / "a.json"
    assert cli.main(["closed-loop", str(export), *ARGS, "--out", str(out), "--videos", "2"]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    videos = res["videos"]
    # The first 2 episodes of each combo, in evaluation order.
    assert [(v["scene"], v["task"], v["episode"]) for v in videos] == [(0, 0, 0), (0, 0, 1), (1, 1, 0), (1, 1, 1)]
    steps = {(e["scene"], e["task"], e["seed"]): e for e in res["episodes_detail"]}
    image_size = 32
    for v in videos:
        path = tmp_path / v["file"]
        assert path.parent.name == "a.videos" and path.stat().st_size == v["bytes"] > 0
        frames = _decode(path)
        episode = steps[(v["scene"], v["task"], v["seed"])]
        assert len(frames) == v["frames"] == episode["steps"] + 1      # start state + one per step
        assert v["success"] == episode["success"] and 0.0 <= v["progress"] <= 1.0
        scale = -(-MIN_TILE // image_size)
        tile = image_size * scale
        assert frames[0].shape == (BAND + tile, 3 * tile, 3)          # head | left_wrist | right_wrist
        # Frame 0's head tile is the start state as MiniWorld.render draws it (H.264 is lossy: a tolerance).
        world = MiniWorld(v["scene"], v["task"], seed=v["seed"], image_size=image_size)
        expected = world.render("head").repeat(scale, 0).repeat(scale, 1).astype(float)
        head = frames[0][BAND:BAND + tile, :tile].astype(float)
        assert np.abs(head - expected).mean() < 6.0
        other_start = MiniWorld(v["scene"], v["task"], seed=v["seed"] + 1, image_size=image_size)
        assert np.abs(head - other_start.render("head").repeat(scale, 0).repeat(scale, 1)).mean() > 2 * np.abs(head - expected).mean()
    assert f"videos: 4 in {tmp_path / 'a.videos'} ({sum(v['bytes'] for v in videos)} bytes)" in printed

    # Filming changes no number: the same run without videos gives the same episodes.
    plain = tmp_path / "b.json"
    assert cli.main(["closed-loop", str(export), *ARGS, "--out", str(plain)]) == 0
    assert json.loads(plain.read_text())["episodes_detail"] == res["episodes_detail"]
    assert not (tmp_path / "b.videos").exists()

    # Existing videos are not replaced without --overwrite; --videos needs --out.
    out.unlink()
    (tmp_path / "a.traces.npz").unlink()
    assert cli.main(["closed-loop", str(export), *ARGS, "--out", str(out), "--videos", "2"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert cli.main(["closed-loop", str(export), *ARGS, "--videos", "2"]) == 2
    assert "--videos 2: give N > 0 and --out FILE.json" in capsys.readouterr().err


def test_per_outcome_selection_keeps_k_successes_and_k_failures(tmp_path):
    hold = VideoRecorder(tmp_path / "hold", per_outcome=2, siblings={0: [1]})
    closed_loop.evaluate(closed_loop.HoldPolicy(), ["0:0"], 5, image_size=32, max_steps=5, progress=False,
                         videos=hold)
    assert [v["success"] for v in hold.videos] == [False, False] and hold.dropped == 3
    assert all(v["did_another_task"] is False and v["progress"] == 0.0 for v in hold.videos)
    assert sorted(p.name for p in (tmp_path / "hold").iterdir()) == sorted(v["file"].split("/")[1] for v in hold.videos)

    scripted = VideoRecorder(tmp_path / "scripted", per_outcome=1)
    res = closed_loop.evaluate(closed_loop.ScriptedPolicy(), ["0:0", "0:1"], 2, image_size=32, progress=False,
                               videos=scripted)
    assert res["successes"] == 4
    assert [(v["success"], v["progress"]) for v in scripted.videos] == [(True, 1.0)]
    assert scripted.videos[0]["did_another_task"] is None          # no siblings given: not judged
    assert len(_decode(tmp_path / scripted.videos[0]["file"])) == res["episodes_detail"][0]["steps"] + 1

    with pytest.raises(ValueError, match="exactly one of first_per_combo"):
        VideoRecorder(tmp_path, first_per_combo=1, per_outcome=1)
