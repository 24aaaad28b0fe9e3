"""`megavla data view` opened in a real browser: headless Chromium (tests/helpers/browser.py) loads the
index and episode pages and checks that every video plays and every image decodes, with no broken
local link; the harness itself is checked against pages that are broken on purpose."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megavla.data.cli import main as data_main
from megavla.data_shards.format import Episode, Subtask


def _write_h264(path, frames: int = 20, fps: int = 10) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.height, stream.width, stream.pix_fmt = 64, 96, "yuv420p"
        for i in range(frames):
            image = np.zeros((64, 96, 3), np.uint8)
            image[:, (i * 4) % 96:(i * 4) % 96 + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_browser_harness_tells_good_media_from_broken(browser, tmp_path):
    pytest.importorskip("av")
    _write_h264(tmp_path / "good.mp4")
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00" * 2048)
    (tmp_path / "good.html").write_text('<!doctype html><title>good</title><video src="good.mp4"></video>')
    (tmp_path / "broken.html").write_text(
        '<!doctype html><title>broken</title><video src="corrupt.mp4"></video>'
        '<img src="missing.png"><a href="nowhere.html">gone</a>')

    good = browser.check_page(tmp_path / "good.html")
    assert good.problems() == []
    (video,) = good.videos
    assert video["played"] and video["duration"] == pytest.approx(2.0, abs=0.15)
    assert video["videoWidth"] == 96 and video["decodedFrames"] >= 2

    with pytest.raises(FileNotFoundError, match="no such page"):
        browser.check_page(tmp_path / "absent.html")   # not Chromium's error page, reported as clean
    broken = browser.check_page(tmp_path / "broken.html")
    assert [m["loaded"] for m in broken.media] == [False, False]
    assert broken.videos[0]["error"].startswith("MediaError")
    assert any("nowhere.html" in link for link in broken.broken_links)
    assert any("missing.png" in link for link in broken.broken_links)
    assert any("ERR_FILE_NOT_FOUND" in e for e in broken.console_errors)


# ------------------------------------------------------------------------------ megavla data view
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
MAX_SCREENSHOT_BYTES = 200_000


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    """2 scenes x 2 tasks x 1 episode per embodiment (4 robot, 4 human), 96 px frames, in
    WORKDIR/data/mini (the view test runs in WORKDIR: the pages show the paths as a user types them)."""
    out = tmp_path_factory.mktemp("view") / "data" / "mini"
    assert data_main(["synth", "--out", str(out), "--scenes", "2", "--tasks", "2", "--episodes-per-combo", "1",
                      "--image-size", "96", "--workers", "1", "--no-progress"]) == 0
    return out


def _keys(set_dir: Path) -> list[str]:
    return sorted(k for s in ("robot", "human") for keys in json.loads(
        (set_dir / s / "episode_keys.json").read_text())["shards"].values() for k in keys)


def _save_small_png(src: Path, dst: Path) -> None:
    """A screenshot for docs/: 256-colour PNG (the pages are flat colours + small frames)."""
    from PIL import Image

    Image.open(src).convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(dst, optimize=True)


def test_data_view_pages_load_and_play_in_chromium(browser, synth_set, tmp_path, caplog, monkeypatch):
    pytest.importorskip("av")
    out = tmp_path / "view"
    monkeypatch.chdir(synth_set.parents[1])
    with caplog.at_level(logging.INFO, logger="megavla.data.view"):
        assert data_main(["view", "data/mini", "--out", str(out), "--max-episodes", "4", "--no-progress"]) == 0
    # The default renders the first episode of each combo up to the cap, and says what it left out.
    assert "rendered 4 of 8 episodes" in caplog.text and "4 listed in the index without a page" in caplog.text
    pages = sorted((out / "episodes").glob("*.html"))
    assert [p.stem.split("_")[0] for p in pages] == ["human-ego"] * 2 + ["robot-arm"] * 2

    index = browser.check_page(out / "index.html")
    assert index.problems() == [] and index.external_links == []
    assert len(index.images) == 4                      # a thumbnail per episode page
    assert all(img["naturalWidth"] >= 100 for img in index.images)
    assert index.title.endswith("megavla data view")
    index_html = (out / "index.html").read_text()
    for key in _keys(synth_set):                       # every episode is listed, rendered or not
        assert key in index_html

    for page in (pages[0], pages[-1]):                 # a human and a robot episode
        report = browser.check_page(page)
        assert report.problems() == [] and report.external_links == []
        (video,) = report.videos
        steps = int(re.search(r'id="scrub" min="0" max="(\d+)"', page.read_text()).group(1)) + 1
        assert video["played"] and video["currentTimeAdvance"] > 0.1 and video["decodedFrames"] >= 2
        assert video["duration"] == pytest.approx(steps / 10.0, abs=0.15)    # one frame per step, 10 fps
        cameras = 1 if page.stem.startswith("human") else 3
        assert video["videoWidth"] == cameras * 192 and video["videoHeight"] == 192  # 96 px upscaled x2
        assert sorted(Path(i["src"]).name for i in report.images) == ["curves.png", "strip.jpg"]
        assert all(i["naturalWidth"] > 400 for i in report.images)
        assert any("../index.html" in link for link in re.findall(r'href="([^"]+)"', page.read_text()))

    # The step slider seeks the video and moves the cursor; the subtask follows.
    seek = browser.evaluate(pages[0], """new Promise(done => {
        const v = document.getElementById('video'), s = document.getElementById('scrub');
        v.addEventListener('seeked', () => done({time: v.currentTime,
            step: document.getElementById('step').textContent,
            subtask: document.getElementById('subtask').textContent,
            cursor: document.querySelector('.curves .cursor').style.left}), {once: true});
        s.value = 10; s.dispatchEvent(new Event('input'));
    })""")
    assert seek["time"] == pytest.approx(1.05, abs=0.01) and seek["step"] == "10" and seek["subtask"] != "-"
    assert float(seek["cursor"].rstrip("%")) > 6   # past the axes' left edge (6 % of the figure)

    shots = {"data_view_index.png": out / "index.html", "data_view_human_episode.png": pages[0],
             "data_view_robot_episode.png": pages[-1]}
    keep = os.environ.get("MEGAVLA_UPDATE_SCREENSHOTS") == "1"  # refreshes docs/screenshots/
    for name, page in shots.items():
        # episode pages whole (video, timeline, frames, every curve); the index's first screen
        raw = browser.screenshot(page, tmp_path / name, width=1200, height=900, full_page="episode" in name)
        small = tmp_path / f"small_{name}"
        _save_small_png(raw, small)
        assert small.stat().st_size < MAX_SCREENSHOT_BYTES
        pixels = np.asarray(Image.open(raw).convert("L"), dtype=np.float32)
        assert pixels.shape[1] == 1200 and pixels.shape[0] >= 900 and pixels.std() > 20  # not a blank page
        if keep:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(small, SCREENSHOTS / name)


def test_data_view_refuses_bad_requests_before_writing(synth_set, tmp_path, caplog):
    pytest.importorskip("av")
    out = tmp_path / "view"
    assert data_main(["view", str(synth_set), "--out", str(out), "--episodes", "robot-arm_s0009_t0000_e000000",
                      "--no-progress"]) == 2
    assert "robot-arm_s0009_t0000_e000000" in caplog.text and "keys there look like" in caplog.text
    assert not out.exists()
    key = _keys(synth_set)[0]
    assert data_main(["view", str(synth_set), "--out", str(out), "--episodes", key, "--no-progress"]) == 0
    assert [p.name for p in (out / "episodes").glob("*.html")] == [f"{key}.html"]
    caplog.clear()
    assert data_main(["view", str(synth_set), "--out", str(out), "--episodes", key, "--no-progress"]) == 2
    assert "pass --overwrite" in caplog.text
    other = _keys(synth_set)[-1]
    assert data_main(["view", str(synth_set), "--out", str(out), "--episodes", other, "--overwrite",
                      "--no-progress"]) == 0
    assert [p.name for p in (out / "episodes").glob("*.html")] == [f"{other}.html"]   # the old view is gone


def test_hand_overlay_uses_the_miniworld_head_camera():
    """view_media.project_keypoints must put a point where the mini-world renderer draws it."""
    from megavla.data.view_media import HEAD_FOV_DEG, project_keypoints
    from megavla.data_shards.miniworld import MiniWorld

    world = MiniWorld(scene=0, task=0, embodiment="human/ego", image_size=96)
    camera = world.camera("head")
    assert camera.fov_deg == HEAD_FOV_DEG
    points = world.hand_keypoints_world().reshape(-1, 3)
    in_camera = camera.to_cam(points)
    assert (in_camera[:, 2] > 0).all()
    np.testing.assert_allclose(project_keypoints(in_camera, 96), camera.project(in_camera), atol=1e-6)
    assert np.isnan(project_keypoints(np.array([[0.1, 0.0, -0.5], [np.nan, 0, 1]]), 96)).all()


def _joint_episode(index: int) -> Episode:
    """An imported-style robot/joint episode: 9 joint dims, no cameras, two steps without loss."""
    rng = np.random.default_rng(index)
    steps = 12
    valid = np.ones(steps, bool)
    valid[4:6] = False
    return Episode(embodiment="robot/joint", scene=0, task=index, episode=0, instruction=f"joint task {index}",
                   subtasks=[Subtask("reach", 0, 6), Subtask("lift", 6, steps)], fps=5.0,
                   state=rng.normal(size=(steps, 9)).astype(np.float32),
                   actions=rng.normal(size=(steps, 9)).astype(np.float32),
                   action_mask=np.array([True] * 8 + [False]), step_valid=valid, frames={},
                   extra={"source": "test"})


def test_data_view_shows_camera_less_episodes_and_lists_damaged_shards(browser, tmp_path, caplog):
    """A set without cameras gets pages with curves and no video; a truncated shard is named in the
    index (with how many of its episodes were read) while the rest is still shown."""
    pytest.importorskip("av")
    from megavla.data_shards.writer import ShardSetWriter

    root = tmp_path / "joint"
    with ShardSetWriter(root, target_shard_bytes=1, generator={"test": "view"}) as writer:  # 1 episode/shard
        for i in range(3):
            writer.write(_joint_episode(i))
    last = sorted(root.glob("shard-*.tar"))[-1]
    last.write_bytes(last.read_bytes()[:1536])   # header + part of meta.json: truncated mid-member
    out = tmp_path / "view"
    assert data_main(["view", str(root), "--out", str(out), "--max-episodes", "0", "--no-progress"]) == 0
    assert f"{last}: member at byte" in caplog.text and "(0 of the 1 episodes the manifest lists" in caplog.text
    pages = sorted((out / "episodes").glob("*.html"))
    assert len(pages) == 2
    index_html = (out / "index.html").read_text()
    assert "Skipped (1)" in index_html and last.name in index_html

    index = browser.check_page(out / "index.html")
    assert index.problems() == [] and index.images == []      # no cameras: no thumbnails
    page = browser.check_page(pages[0])
    assert page.problems() == [] and page.videos == []
    (curves,) = page.images
    assert curves["src"].endswith("curves.png") and curves["naturalWidth"] > 400
    html_text = pages[0].read_text()
    assert "[8] (action_mask False)" in html_text and "2 (step_valid False)" in html_text
