"""megavla data import egodex | keypoints: files written by tests/helpers/hand_recordings.py
(EgoDex schema via h5py, NPZ + MP4) from mini-world human episodes, so the expected state/actions
are known."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("av")
pytest.importorskip("h5py")
import simplejpeg  # noqa: E402

from helpers.hand_recordings import write_egodex_episode, write_mp4, write_npz_episode  # noqa: E402
from megavla.data_shards import hands  # noqa: E402
from megavla.data.cli import main as data_main  # noqa: E402
from megavla.data_shards.format import sample_to_episode  # noqa: E402
from megavla.data_shards.manifest import load_manifest  # noqa: E402
from megavla.data_shards.synth import generate_episode  # noqa: E402
from megavla.data_shards.verify import iter_tar_samples  # noqa: E402

SIZE = 64


@pytest.fixture(scope="module")
def human_eps():
    return [generate_episode("human/ego", 0, task, 0, image_size=SIZE, seed=3) for task in (0, 1)]


def read_set(out):
    eps = []
    for row in load_manifest(out)["shards"]:
        eps += [sample_to_episode(s) for s in iter_tar_samples(out / row["path"], [])]
    return eps


def imported(kind, src, out, *extra):
    code = data_main(["import", kind, str(src), "--out", str(out), "--image-size", str(SIZE),
                      "--no-progress", *extra])
    return code, (read_set(out) if code == 0 else [])


def assert_same_motion(got, want, atol=2e-4, gripper_state=True):
    np.testing.assert_array_equal(got.step_valid, want.step_valid)
    np.testing.assert_array_equal(got.action_mask, want.action_mask)
    valid = want.step_valid
    sup = want.action_mask
    np.testing.assert_allclose(got.actions[valid][:, sup], want.actions[valid][:, sup], atol=atol)
    dims = np.ones(want.state.shape[1], bool)
    if not gripper_state:  # the (masked) closure estimate needs the thumb tip
        dims[list(hands.STATE_GRIPPER_DIMS)] = False
    np.testing.assert_allclose(got.state[:, dims], want.state[:, dims], atol=atol)


def frames_close(got, want, limit=10.0):
    a = np.stack([simplejpeg.decode_jpeg(j) for j in got.frames["head"]]).astype(float)
    b = np.stack([simplejpeg.decode_jpeg(j) for j in want.frames["head"]]).astype(float)
    return np.abs(a - b).mean() < limit


def test_keypoints_npz_round_trips_the_miniworld_human_episodes(tmp_path, human_eps):
    (tmp_path / "src").mkdir()
    for i, ep in enumerate(human_eps):
        write_npz_episode(tmp_path / "src" / f"clip{i}.npz", ep)
    code, eps = imported("keypoints", tmp_path / "src", tmp_path / "out")
    assert code == 0 and len(eps) == 2
    for got, want in zip(eps, human_eps):
        assert (got.embodiment, got.instruction, got.task, got.fps) == ("human/ego", want.instruction, want.task, 10.0)
        assert got.num_steps == want.num_steps and not got.action_mask[list(hands.GRIPPER_DIMS)].any()
        assert_same_motion(got, want)
        np.testing.assert_array_equal(got.hand_keypoints, want.hand_keypoints)  # NaN dropouts included
        np.testing.assert_array_equal(got.head_pose, want.head_pose)
        assert frames_close(got, want)


def test_egodex_import_maps_the_skeleton_and_camera(tmp_path, human_eps):
    part = tmp_path / "part1"
    write_egodex_episode(part / "pick_block", 0, human_eps[0], "Pick up the block.")
    write_egodex_episode(part / "push_block", 0, human_eps[1], "Push it.", camera_axes="opencv",
                         description2="Push the block back.")
    code, eps = imported("egodex", part, tmp_path / "out", "--fps", "30")
    assert code == 0 and [e.instruction for e in eps] == ["Pick up the block.", "Push the block back."]
    assert [e.task for e in eps] == [0, 1] and [e.extra["camera_axes"] for e in eps] == ["arkit", "opencv"]
    for got, want in zip(eps, human_eps):
        assert got.fps == 30.0 and got.extra["missing_joints"] == []
        assert_same_motion(got, want)
        np.testing.assert_allclose(got.hand_keypoints, want.hand_keypoints, atol=1e-5)
        assert frames_close(got, want)
    # --fps 10 keeps every third pose and frame
    code, sub = imported("egodex", part, tmp_path / "sub", "--fps", "10")
    assert code == 0 and sub[0].num_steps == len(range(0, human_eps[0].num_steps, 3))
    np.testing.assert_allclose(sub[0].hand_keypoints[2], human_eps[0].hand_keypoints[6], atol=1e-5)


def test_egodex_missing_joints_nan_poses_and_low_confidence(tmp_path, human_eps):
    ep = human_eps[0]
    T = ep.num_steps
    part = tmp_path / "part"
    write_egodex_episode(part / "t", 0, ep, "a", drop=("leftThumbTip",))  # non-palm joint: kept
    write_egodex_episode(part / "t", 1, ep, "b", nan_frames={"rightHand": (4, 5)})  # NaN wrist
    write_egodex_episode(part / "t", 2, ep, "c", confidence={"leftMiddleFingerKnuckle": ((7,), 0.1)})
    write_egodex_episode(part / "t", 3, ep, "d", drop=("rightIndexFingerKnuckle",))  # palm joint
    code, eps = imported("egodex", part, tmp_path / "out", "--fps", "30")
    assert code == 0 and [e.instruction for e in eps] == ["a", "b", "c"]
    a, b, c = eps
    assert a.extra["missing_joints"] == ["leftThumbTip"]
    assert np.isnan(a.hand_keypoints[:, 1, hands.KP["thumb_tip"]]).all()
    assert_same_motion(a, ep, gripper_state=False)  # the palm does not need the thumb tip
    want_b = ep.step_valid.copy()
    want_b[[3, 4, 5]] = False  # steps 4, 5 have no right palm; step 3's action ends in step 4
    np.testing.assert_array_equal(b.step_valid, want_b)
    assert b.extra["frames_without_palm"]["right"] >= 2
    want_c = ep.step_valid.copy()
    want_c[[6, 7]] = False
    np.testing.assert_array_equal(c.step_valid, want_c)
    assert c.extra["low_confidence_keypoints"] == 1
    skipped = load_manifest(tmp_path / "out")["generator"]["skipped"]
    assert [s["episode"] for s in skipped] == ["t/3.hdf5"]
    assert "no valid step" in skipped[0]["reason"] and "rightIndexFingerKnuckle" in skipped[0]["reason"]
    assert T > 8


def test_bad_hand_recordings_are_named_and_skipped(tmp_path, human_eps, caplog):
    ep = human_eps[0]
    part = tmp_path / "part"
    write_egodex_episode(part / "t", 0, ep, "ok")
    write_egodex_episode(part / "t", 1, ep, "short video", video_frames=ep.num_steps - 5)
    write_egodex_episode(part / "t", 2, ep, "no video")
    (part / "t" / "2.mp4").unlink()
    (part / "t" / "3.hdf5").write_bytes(b"not hdf5")
    code, eps = imported("egodex", part, tmp_path / "out", "--fps", "30")
    assert code == 0 and [e.instruction for e in eps] == ["ok"]
    reasons = {s["episode"]: s["reason"] for s in load_manifest(tmp_path / "out")["generator"]["skipped"]}
    assert f"video ends after {ep.num_steps - 5} of {ep.num_steps} frames" in reasons["t/1.hdf5"]
    assert "the video is shorter than the episode" in reasons["t/1.hdf5"]
    assert "2.mp4 is missing" in reasons["t/2.hdf5"]
    assert "not a readable HDF5 file" in reasons["t/3.hdf5"]
    # NPZ route: a missing array and a NaN head track
    src = tmp_path / "npz"
    src.mkdir()
    np.savez(src / "a.npz", hand_keypoints=ep.hand_keypoints, instruction=np.array("x"))
    write_npz_episode(src / "b.npz", ep)
    bad_head = np.full_like(ep.head_pose, np.nan)
    np.savez(src / "c.npz", hand_keypoints=ep.hand_keypoints, head_pose=bad_head, instruction=np.array("y"))
    write_mp4(src / "c.mp4", [np.zeros((SIZE, SIZE, 3), np.uint8)] * ep.num_steps, 10)
    code, eps = imported("keypoints", src, tmp_path / "npz_out")
    assert code == 0 and len(eps) == 1
    reasons = {s["episode"]: s["reason"] for s in load_manifest(tmp_path / "npz_out")["generator"]["skipped"]}
    assert "missing array(s) ['head_pose']" in reasons["a.npz"]
    assert "no finite head pose" in reasons["c.npz"]
    assert imported("egodex", tmp_path / "empty_dir_missing", tmp_path / "x")[0] == 1
    assert "not a directory" in caplog.text


def test_imported_sets_train_together_in_a_50_50_mixture(tmp_path, human_eps):
    """README "Your own data": LeRobot robot set + EgoDex human set -> the reader, 50/50."""
    pytest.importorskip("pyarrow", reason="pip install -e .[import] (pyarrow<22 with numpy<2)")
    import itertools
    from pathlib import Path

    import torch

    from megavla.config.data import DataConfig
    from megavla.data.pipeline import build_loader
    from megavla.tokenizers.pair import train_tokenizers

    lerobot = Path(__file__).parent / "fixtures" / "lerobot_v30_tiny"
    assert data_main(["import", "lerobot", str(lerobot), "--out", str(tmp_path / "robot"),
                      "--image-size", "32", "--no-progress"]) == 0
    for i, ep in enumerate(human_eps):
        write_egodex_episode(tmp_path / "egodex" / "task", i, ep, f"human task {i}")
    assert data_main(["import", "egodex", str(tmp_path / "egodex"), "--out", str(tmp_path / "human"),
                      "--image-size", "32", "--no-progress"]) == 0
    sets = {"robot": str(tmp_path / "robot"), "human": str(tmp_path / "human")}
    text_tok, fast_tok = train_tokenizers(list(sets.values()), tmp_path / "tok", text_vocab=300,
                                          fast_vocab=300, chunk_length=4, chunk_stride=2)
    cfg = DataConfig(sources=sets, mixture={"robot": 0.5, "human": 0.5}, image_size=32, batch_size=8,
                     num_workers=0, chunk_length=4, shuffle_buffer=8, samples_per_episode=2)
    batches = list(itertools.islice(build_loader(cfg, text_tok, fast_tok), 4))
    embodiments = torch.cat([b.embodiment for b in batches])
    assert set(embodiments.tolist()) == {1, 3}  # human/ego, robot/joint
    assert abs(int((embodiments == 1).sum()) - len(embodiments) // 2) <= 2
    for b in batches:
        assert torch.isfinite(b.actions).all() and torch.isfinite(b.state).all()
        joint = b.embodiment == 3
        assert b.action_dim_mask[joint, :6].all() and not b.action_dim_mask[joint, 6:].any()
