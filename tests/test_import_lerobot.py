"""megavla data import lerobot: on datasets written by lerobot itself (tests/fixtures/lerobot_v30_tiny
with AV1 videos and lerobot_v30_png_tiny with PNG frames in the parquet, made by
tests/fixtures/make_lerobot_fixture.py with lerobot 0.4.4), plus bad and hostile input."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow", reason="pip install -e .[import] (pyarrow<22 with numpy<2)")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("av")
import simplejpeg  # noqa: E402

from megavla.data.cli import main as data_main  # noqa: E402
from megavla.data_shards.format import sample_to_episode  # noqa: E402
from megavla.data_shards.manifest import load_manifest  # noqa: E402
from megavla.data_shards.verify import iter_tar_samples, verify_shard_set  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
import make_lerobot_fixture as made  # noqa: E402

SRC = FIXTURES / "lerobot_v30_tiny"
PNG_SRC = FIXTURES / "lerobot_v30_png_tiny"
DATA = "data/chunk-000/file-000.parquet"


def read_set(out: Path) -> list:
    eps = []
    for row in load_manifest(out)["shards"]:
        eps += [sample_to_episode(s) for s in iter_tar_samples(out / row["path"], [])]
    return eps


def run_import(src: Path, out: Path, *extra: str) -> int:
    return data_main(["import", "lerobot", str(src), "--out", str(out), "--image-size", "64",
                      "--no-progress", *extra])


def test_fixture_was_written_by_lerobot():
    made_by = json.loads((SRC / "MADE_BY.json").read_text())
    assert made_by["codebase_version"] == "v3.0" and made_by["lerobot_version"] == "0.4.4"
    info = json.loads((SRC / "meta/info.json").read_text())
    assert info["features"]["observation.images.top"]["info"]["video.codec"] == "av1"
    assert sum(p.stat().st_size for p in SRC.rglob("*") if p.is_file()) < 200_000


def test_import_matches_what_lerobot_wrote(tmp_path):
    assert run_import(SRC, tmp_path / "out") == 0
    eps = read_set(tmp_path / "out")
    assert [e.num_steps for e in eps] == list(made.EPISODE_LENGTHS)
    assert [e.instruction for e in eps] == list(made.EPISODE_TASKS)
    assert [e.task for e in eps] == [0, 1, 0] and [e.episode for e in eps] == [0, 1, 2]
    for ep_index, ep in enumerate(eps):
        assert ep.embodiment == "robot/joint" and ep.action_mask.all() and ep.step_valid.all()
        want_state = np.stack([made.expected_state(ep_index, t) for t in range(ep.num_steps)])
        want_action = np.stack([made.expected_action(ep_index, t) for t in range(ep.num_steps)])
        np.testing.assert_array_equal(ep.state, want_state)
        np.testing.assert_array_equal(ep.actions, want_action)
        np.testing.assert_array_equal(ep.joint_actions, want_action)
        assert ep.fps == made.FPS and sorted(ep.frames) == ["head", "right_wrist"]
        for cam, key in (("head", "observation.images.top"), ("right_wrist", "observation.images.wrist")):
            h, w = made.CAMERAS[key]
            scale = 64 / max(h, w)
            top, left = (64 - round(h * scale)) // 2, (64 - round(w * scale)) // 2
            for t in (0, ep.num_steps // 2, ep.num_steps - 1):  # AV1 is lossy: compare flat regions
                img = simplejpeg.decode_jpeg(ep.frames[cam][t]).astype(int)
                want_top, want_bottom = made.expected_colors(key, ep_index, t)
                hh = round(h * scale)
                upper = img[top + 2: top + hh // 2 - 2, left + 2: 64 - left - 2].mean((0, 1))
                lower = img[top + hh // 2 + 2: top + hh - 2, left + 2: 64 - left - 2].mean((0, 1))
                assert np.abs(upper - want_top).max() < 12, (cam, ep_index, t, upper, want_top)
                assert np.abs(lower - want_bottom).max() < 12, (cam, ep_index, t, lower, want_bottom)
                if top:
                    assert img[: top - 1].max() < 20  # letterbox bars, aspect kept
    stats = json.loads((tmp_path / "out/norm_stats.json").read_text())
    assert stats["robot/joint"]["num_steps"] == sum(made.EPISODE_LENGTHS)
    report = verify_shard_set(tmp_path / "out", check_images=True, progress=False)
    assert report.ok, report.problems


def test_import_is_deterministic_across_workers_and_fps_subsamples(tmp_path):
    assert run_import(SRC, tmp_path / "a", "--workers", "1") == 0
    assert run_import(SRC, tmp_path / "b", "--workers", "2") == 0
    sha = [[r["sha256"] for r in load_manifest(tmp_path / d)["shards"]] for d in ("a", "b")]
    assert sha[0] == sha[1]
    assert run_import(SRC, tmp_path / "c", "--fps", "5") == 0
    eps = read_set(tmp_path / "c")
    assert [e.num_steps for e in eps] == [10, 14, 17] and eps[0].fps == 5
    np.testing.assert_array_equal(eps[1].state[3], made.expected_state(1, 6))
    assert run_import(SRC, tmp_path / "d", "--fps", "3") == 1  # 10 / 3 is not an integer stride


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(SRC, dst)
    return dst


def _rewrite_data(src: Path, fn) -> None:
    table = pq.read_table(src / DATA)
    pq.write_table(fn(table), src / DATA)


def _set_rows(table, column: str, episode: int, value):
    values = table.column(column).to_pylist()
    episodes = table.column("episode_index").to_pylist()
    new = [value if e == episode else v for v, e in zip(values, episodes)]
    kind = table.schema.field(column).type
    if value is None and pa.types.is_fixed_size_list(kind):
        kind = pa.list_(kind.value_type)  # pyarrow cannot read back null fixed-size lists
    return table.set_column(table.column_names.index(column), column, pa.array(new, type=kind))


def test_bad_episodes_are_skipped_named_and_counted(tmp_path, caplog, capsys):
    src = _copy(tmp_path)
    # episode 1: a task index with no task; episode 2: frames but no actions
    _rewrite_data(src, lambda t: _set_rows(_set_rows(t, "task_index", 1, 7), "action", 2, None))
    assert run_import(src, tmp_path / "out") == 0
    eps = read_set(tmp_path / "out")
    assert [e.episode for e in eps] == [0]
    skipped = load_manifest(tmp_path / "out")["generator"]["skipped"]
    assert [s["episode"] for s in skipped] == ["episode 1", "episode 2"]
    assert "task_index 7 has no task in meta/tasks" in skipped[0]["reason"]
    assert "column 'action' (actions) is null in 33 of 33 frames: frames but no actions" in skipped[1]["reason"]
    assert DATA in skipped[1]["reason"]
    out = capsys.readouterr().out
    assert "skipped 2" in out and "skipped episode 1: episode 1: task_index 7" in out


def test_corrupt_data_file_skips_its_episodes(tmp_path):
    src = _copy(tmp_path)
    episodes_file = src / "meta/episodes/chunk-000/file-000.parquet"
    table = pq.read_table(episodes_file)
    table = _set_rows(table, "data/file_index", 2, 1)  # episode 2 lives in a second data file ...
    pq.write_table(table, episodes_file)
    (src / "data/chunk-000/file-001.parquet").write_bytes(b"PAR1 this is not parquet")  # ... corrupt
    assert run_import(src, tmp_path / "out") == 0
    skipped = load_manifest(tmp_path / "out")["generator"]["skipped"]
    assert len(skipped) == 1 and skipped[0]["episode"] == "episode 2"
    assert "file-001.parquet is not a readable parquet file" in skipped[0]["reason"]
    assert [e.episode for e in read_set(tmp_path / "out")] == [0, 1]


def test_missing_video_and_other_version_are_refused(tmp_path, caplog):
    src = _copy(tmp_path)
    (src / "videos/observation.images.wrist/chunk-000/file-000.mp4").unlink()
    assert run_import(src, tmp_path / "out") == 1  # every episode needs that file: nothing to import
    assert "none of the 3 source episodes could be imported" in caplog.text
    assert "videos/observation.images.wrist/chunk-000/file-000.mp4 is missing" in caplog.text
    assert not (tmp_path / "out/manifest.json").exists()
    # only the head camera: the same dataset imports
    assert run_import(src, tmp_path / "head", "--cameras", "head=observation.images.top") == 0
    assert [sorted(e.frames) for e in read_set(tmp_path / "head")] == [["head"]] * 3
    info = json.loads((src / "meta/info.json").read_text())
    info["codebase_version"] = "v1.6"
    (src / "meta/info.json").write_text(json.dumps(info))
    caplog.clear()
    assert run_import(src, tmp_path / "v16") == 1
    assert "codebase_version='v1.6'" in caplog.text and "convert_dataset_v21_to_v30" in caplog.text
    assert run_import(tmp_path / "nowhere", tmp_path / "x") == 1
    assert "not a LeRobot dataset directory" in caplog.text


def test_unknown_feature_and_camera_are_refused_before_work(tmp_path, caplog):
    assert run_import(SRC, tmp_path / "a", "--state", "observation.qpos") == 1
    assert "no feature 'observation.qpos' for --state" in caplog.text
    assert run_import(SRC, tmp_path / "b", "--cameras", "head=observation.images.side") == 1
    assert "is not a camera feature (dtype video or image)" in caplog.text
    assert run_import(SRC, tmp_path / "c", "--action-space", "ee") == 1  # a 6-dim joint state
    assert "needs 'observation.state' = [x, y, z, rx, ry, rz, gripper]" in caplog.text
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in "abc")


def test_ee_action_space_follows_the_project_convention(tmp_path):
    """A dataset whose state is an EE pose [x, y, z, rx, ry, rz, gripper]: state = position + 6D
    rotation + gripper, actions = hands.ee_delta between consecutive poses (robot/arm)."""
    from scipy.spatial.transform import Rotation

    from megavla.data_shards import hands

    src = _copy(tmp_path)
    table = pq.read_table(src / DATA)
    n = table.num_rows
    ee = np.zeros((n, 7), np.float32)
    ee[:, 0] = 0.4 + 0.01 * np.arange(n)  # moves forward 1 cm per frame
    ee[:, 5] = 0.02 * np.arange(n)  # turns 0.02 rad per frame about z
    ee[:, 6] = (np.arange(n) % 20) > 10
    column = pa.FixedSizeListArray.from_arrays(pa.array(ee.ravel()), 7)
    pq.write_table(table.append_column("observation.ee_pose", column), src / DATA)
    info = json.loads((src / "meta/info.json").read_text())
    info["features"]["observation.ee_pose"] = {"dtype": "float32", "shape": [7], "names": None}
    (src / "meta/info.json").write_text(json.dumps(info))
    assert run_import(src, tmp_path / "out", "--state", "observation.ee_pose", "--action-space", "ee") == 0
    eps = read_set(tmp_path / "out")
    ep = eps[1]  # rows 20..46
    rows = ee[20:47]
    assert ep.embodiment == "robot/arm" and ep.state.shape == (27, hands.ARM_STATE_DIM)
    np.testing.assert_allclose(ep.state[:, :3], rows[:, :3], atol=1e-6)
    want_rot = Rotation.from_rotvec(rows[:, 3:6]).as_matrix()
    np.testing.assert_allclose(ep.state[:, 3:6], want_rot[:, :, 0], atol=1e-6)  # first column
    np.testing.assert_allclose(ep.state[:, 9], rows[:, 6])
    np.testing.assert_allclose(ep.actions[:-1, 0], 0.01, atol=1e-6)
    np.testing.assert_allclose(ep.actions[:-1, 5], 0.02, atol=1e-6)
    np.testing.assert_allclose(ep.actions[:-1, 6], rows[1:, 6])
    np.testing.assert_array_equal(ep.actions[-1, :6], 0)
    np.testing.assert_array_equal(ep.joint_actions, np.stack([made.expected_action(1, t) for t in range(27)]))


def _v21_from_fixture(dst: Path) -> None:
    """The v2.1 layout of the same dataset (one parquet + one MP4 per episode, jsonl metadata),
    made here from the lerobot-written v3.0 fixture (lerobot 0.4.4 writes only v3.0)."""
    import av

    from helpers.hand_recordings import write_mp4

    info = json.loads((SRC / "meta/info.json").read_text())
    info.update(codebase_version="v2.1",
                data_path="data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                video_path="videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4")
    (dst / "meta").mkdir(parents=True)
    (dst / "meta/info.json").write_text(json.dumps(info))
    (dst / "meta/tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in
                                                  enumerate(dict.fromkeys(made.EPISODE_TASKS))))
    (dst / "meta/episodes.jsonl").write_text("".join(
        json.dumps({"episode_index": e, "tasks": [made.EPISODE_TASKS[e]], "length": n}) + "\n"
        for e, n in enumerate(made.EPISODE_LENGTHS)))
    table = pq.read_table(SRC / DATA)
    starts = np.cumsum((0,) + made.EPISODE_LENGTHS)
    (dst / "data/chunk-000").mkdir(parents=True)
    for e in range(len(made.EPISODE_LENGTHS)):
        rows = table.slice(int(starts[e]), made.EPISODE_LENGTHS[e])
        pq.write_table(rows, dst / f"data/chunk-000/episode_{e:06d}.parquet")
    for key in made.CAMERAS:
        with av.open(str(SRC / f"videos/{key}/chunk-000/file-000.mp4")) as container:
            images = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        (dst / f"videos/chunk-000/{key}").mkdir(parents=True)
        for e in range(len(made.EPISODE_LENGTHS)):
            write_mp4(dst / f"videos/chunk-000/{key}/episode_{e:06d}.mp4",
                      images[starts[e]:starts[e + 1]], made.FPS)


def test_v21_layout_imports_the_same_episodes(tmp_path):
    _v21_from_fixture(tmp_path / "v21")
    assert run_import(tmp_path / "v21", tmp_path / "out") == 0
    eps = read_set(tmp_path / "out")
    assert [e.num_steps for e in eps] == list(made.EPISODE_LENGTHS)
    assert [e.instruction for e in eps] == list(made.EPISODE_TASKS)
    for ep_index, ep in enumerate(eps):
        np.testing.assert_array_equal(ep.actions, np.stack([made.expected_action(ep_index, t)
                                                            for t in range(ep.num_steps)]))
        img = simplejpeg.decode_jpeg(ep.frames["head"][-1]).astype(int)
        top, _ = made.expected_colors("observation.images.top", ep_index, ep.num_steps - 1)
        assert np.abs(img[12:28, 4:60].mean((0, 1)) - top).max() < 14


def _assert_colors(jpeg: bytes, key: str, episode: int, t: int, size: int = 64, tol: float = 12) -> None:
    """The letterboxed frame's two flat halves have the colours the maker drew."""
    img = simplejpeg.decode_jpeg(jpeg).astype(int)
    h, w = made.CAMERAS[key]
    scale = size / max(h, w)
    hh, ww = round(h * scale), round(w * scale)
    top, left = (size - hh) // 2, (size - ww) // 2
    upper = img[top + 2: top + hh // 2 - 2, left + 2: left + ww - 2].mean((0, 1))
    lower = img[top + hh // 2 + 2: top + hh - 2, left + 2: left + ww - 2].mean((0, 1))
    want_top, want_bottom = made.expected_colors(key, episode, t)
    assert np.abs(upper - want_top).max() < tol, (key, episode, t, upper, want_top)
    assert np.abs(lower - want_bottom).max() < tol, (key, episode, t, lower, want_bottom)


def test_png_in_parquet_set_imports_every_frame(tmp_path, capsys):
    """lerobot's use_videos=False layout: PNG bytes in struct<bytes, path> columns that come before
    episode_index, one row group per episode. The importer must read the row-group statistics of
    episode_index's own leaf column (an Arrow field index points at 'timestamp' there, whose range
    0.0-0.7 s leaves out episode 2: it was skipped, and no frame was imported at all)."""
    made_by = json.loads((PNG_SRC / "MADE_BY.json").read_text())
    assert made_by["lerobot_version"] == "0.4.4" and made_by["use_videos"] is False
    assert sum(p.stat().st_size for p in PNG_SRC.rglob("*") if p.is_file()) < 200_000
    pf = pq.ParquetFile(PNG_SRC / DATA)
    leaves = [pf.metadata.row_group(0).column(i).path_in_schema for i in range(pf.metadata.num_columns)]
    assert leaves[pf.schema_arrow.get_field_index("episode_index")] == "timestamp"  # the trap is there
    assert pf.metadata.num_row_groups == len(made.PNG_EPISODE_LENGTHS)

    assert run_import(PNG_SRC, tmp_path / "out") == 0
    assert load_manifest(tmp_path / "out")["generator"]["skipped"] == []
    assert "skipped 0" in capsys.readouterr().out
    eps = read_set(tmp_path / "out")
    assert [e.num_steps for e in eps] == list(made.PNG_EPISODE_LENGTHS)
    assert [e.instruction for e in eps] == list(made.PNG_EPISODE_TASKS)
    for ep_index, ep in enumerate(eps):
        np.testing.assert_array_equal(ep.state, np.stack([made.expected_state(ep_index, t)
                                                          for t in range(ep.num_steps)]))
        np.testing.assert_array_equal(ep.actions, np.stack([made.expected_action(ep_index, t)
                                                            for t in range(ep.num_steps)]))
        assert sorted(ep.frames) == ["head", "right_wrist"]
        for cam, key in (("head", "observation.images.top"), ("right_wrist", "observation.images.wrist")):
            assert len(ep.frames[cam]) == ep.num_steps
            for t in range(ep.num_steps):  # lossless PNG in, JPEG q90 of flat colours out
                _assert_colors(ep.frames[cam][t], key, ep_index, t, tol=6)
    assert verify_shard_set(tmp_path / "out", check_images=True, progress=False).ok
    # an output rate below the source's keeps every other PNG frame, as for videos
    assert run_import(PNG_SRC, tmp_path / "half", "--fps", "5") == 0
    ep = read_set(tmp_path / "half")[1]
    assert ep.num_steps == 13
    _assert_colors(ep.frames["head"][6], "observation.images.top", 1, 12, tol=6)


def _point_episode_2_at_second_video(src: Path) -> Path:
    """Episode 2's wrist frames move to videos/.../file-001.mp4 (the caller writes that file)."""
    episodes_file = src / "meta/episodes/chunk-000/file-000.parquet"
    table = _set_rows(pq.read_table(episodes_file), "videos/observation.images.wrist/file_index", 2, 1)
    table = _set_rows(table, "videos/observation.images.wrist/from_timestamp", 2, 0.0)
    pq.write_table(table, episodes_file)
    return src / "videos/observation.images.wrist/chunk-000/file-001.mp4"


@pytest.mark.parametrize("garbage", ["truncated", "random"])
def test_undecodable_video_is_a_named_counted_skip(tmp_path, capsys, garbage):
    """A 200-byte MP4 (the head of a real one: no video stream; or random bytes) skips the episodes
    that need it, named and counted; it ended the import with an IndexError traceback before."""
    src = _copy(tmp_path)
    bad = _point_episode_2_at_second_video(src)
    head = (SRC / "videos/observation.images.wrist/chunk-000/file-000.mp4").read_bytes()[:200]
    bad.write_bytes(head if garbage == "truncated" else np.random.default_rng(0).bytes(200))
    assert run_import(src, tmp_path / "out") == 0
    assert [e.episode for e in read_set(tmp_path / "out")] == [0, 1]
    skipped = load_manifest(tmp_path / "out")["generator"]["skipped"]
    assert [s["episode"] for s in skipped] == ["episode 2"]
    reason = skipped[0]["reason"]
    assert "observation.images.wrist/chunk-000/file-001.mp4" in reason
    assert ("no video stream (200 bytes" if garbage == "truncated" else "cannot decode") in reason
    out = capsys.readouterr().out
    assert "skipped 1" in out and "skipped episode 2:" in out


def test_video_with_another_rate_names_the_field_it_came_from(tmp_path, caplog):
    src = _copy(tmp_path)
    info = json.loads((src / "meta/info.json").read_text())
    info["fps"] = 20  # the videos run at 10 fps: every second target frame is missing
    (src / "meta/info.json").write_text(json.dumps(info))
    assert run_import(src, tmp_path / "out") == 1
    assert "another frame rate than 20.0 fps (the rate is meta/info.json 'fps')" in caplog.text
    assert "--source-fps" not in caplog.text


@pytest.mark.parametrize("key,template", [
    ("video_path", "../outside/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"),
    ("data_path", "{outside}/data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"),
    ("data_path", "data/../../outside/data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"),
    ("video_path", "videos/{video_key.__class__}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"),
])
def test_metadata_paths_outside_the_root_are_refused(tmp_path, caplog, key, template):
    """Templates in meta/info.json are someone else's: a path they give must stay under the dataset
    root. Real, readable files wait outside it (they were imported before, without a word)."""
    src = _copy(tmp_path)
    shutil.copytree(SRC / "videos", tmp_path / "outside")
    shutil.copytree(SRC / "data", tmp_path / "outside/data")
    info = json.loads((src / "meta/info.json").read_text())
    info[key] = template.replace("{outside}", str(tmp_path / "outside"))
    (src / "meta/info.json").write_text(json.dumps(info))
    assert run_import(src, tmp_path / "out") == 1
    assert f"meta/info.json: {key}=" in caplog.text
    if "__class__" in template:
        assert "field {video_key.__class__} is not one of" in caplog.text
    else:
        assert "a file outside the dataset root" in caplog.text and f"fix {key} in meta/info.json" in caplog.text
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_messages_name_only_options_that_exist():
    """Every --option the importers' messages and help name is an option of `megavla data import`
    (a message once told users to pass --source-fps, which no command has)."""
    import re

    from megavla.data.cli import build_parser

    parser = build_parser()
    importer = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["import"]
    kinds = next(a for a in importer._subparsers._group_actions if a.dest == "source").choices
    options = {o for kind in kinds.values() for a in kind._actions for o in a.option_strings}
    repo = Path(__file__).resolve().parents[1]
    sources = sorted(repo.glob("data_shards/import*.py")) + [repo / "megavla/data/import_cli.py"]
    named = {}
    for path in sources:
        for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", path.read_text()):
            named.setdefault(option, path.name)
    assert len(sources) >= 5 and "--cameras" in named
    named.pop("--repo-id")  # lerobot's own conversion command (import_lerobot_meta.CONVERT_HINT)
    assert {o: f for o, f in named.items() if o not in options} == {}
