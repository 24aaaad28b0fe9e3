"""`megavla data view` opened in a real browser: headless Chromium (tests/browser.py) loads the
index and episode pages and checks that every video plays and every image decodes, with no broken
local link; the harness itself is checked against pages that are broken on purpose."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest


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

    broken = browser.check_page(tmp_path / "broken.html")
    assert [m["loaded"] for m in broken.media] == [False, False]
    assert broken.videos[0]["error"].startswith("MediaError")
    assert any("nowhere.html" in link for link in broken.broken_links)
    assert any("missing.png" in link for link in broken.broken_links)
    assert any("ERR_FILE_NOT_FOUND" in e for e in broken.console_errors)
