"""The one H.264 MP4 writer of the pages a person looks at (``megavla data view``, rollout videos)."""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np


def write_h264_mp4(path: str | Path, frames: list[np.ndarray], fps: float, crf: int = 23) -> Path:
    """RGB uint8 frames [H, W, 3] (even H and W: yuv420p) -> H.264 MP4 at ``path``, one video frame per
    step. libx264 + yuv420p play in Chromium and Firefox; the moov atom goes first (+faststart) so a
    browser starts before the end has loaded. Written to a temporary name and renamed, so a reader
    never sees half a file. Needs PyAV (the `import` extra)."""
    import av
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.mp4")
    height, width = frames[0].shape[:2]
    with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return path
