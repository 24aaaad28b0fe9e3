"""What every importer shares: the resumable run loop, skip accounting, video decoding, frame encoding.

An importer lists its source episodes in a fixed order (``SourceEpisode``: a name for messages and
a JSON-able locator) and supplies ``convert(locator) -> Episode``, which raises ``SkipEpisode`` for
an episode it cannot use. ``run_import`` feeds the episodes in that order (converted by a bounded
process pool, so memory holds at most ``2 * workers`` episodes) to one resumable ShardSetWriter:

* deterministic: the same source and options give byte-identical shards, any worker count;
* resumable: a killed import rerun with the same arguments continues after the last committed
  shard (data_shards/writer.py); no episode is written twice; skips before that point are kept;
* every skipped episode is logged with its name and reason, counted, and stored in the manifest's
  ``generator.skipped``; if nothing could be imported the import is refused (exit 1), not finished.
"""
from __future__ import annotations

import logging
import multiprocessing
import time
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from .format import Episode, encode_jpeg, resize_with_pad
from .writer import ShardSetWriter

log = logging.getLogger(__name__)



class SkipEpisode(Exception):
    """This episode cannot be imported; the message names the file, the field and the reason."""


class ImportRefused(Exception):
    """Nothing can be imported (wrong format version, unreadable metadata): refused before any work."""


@dataclass
class SourceEpisode:
    name: str  # for messages: "episode 12 (data/chunk-000/file-000.parquet)", "task/3.hdf5"
    locator: Any  # JSON-able; handed to convert() in a worker


@dataclass
class ImportReport:
    written: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    resumed_from: int = 0
    frames: int = 0
    seconds: float = 0.0
    manifest: dict[str, Any] | None = None


# ------------------------------------------------------------------------------------ frames
def decode_video_frames(path: Path, start_s: float, num_frames: int, fps: float,
                        image_size: int, what: str, stride: int = 1, *, fps_from: str) -> list[bytes]:
    """Frames at ``start_s + t * stride / fps`` (t < ``num_frames``) of a video recorded at
    ``fps``, letterboxed to ``image_size`` and JPEG-encoded. One seek per call (per episode), then
    sequential decoding; frames between targets are decoded and dropped. ``fps_from`` says where
    the importer took ``fps`` from (a field or an option that exists), for the gap message.

    Frame t is the first decoded frame whose timestamp is within half a source frame of its
    target; a video that ends early, has no video stream or does not decode raises SkipEpisode
    naming the file (a truncated download is one skipped episode, not the end of the import).
    """
    import av  # PyAV: an optional dependency (extra "import")

    if not path.is_file():
        raise SkipEpisode(f"{what}: video file {path} is missing")
    frames: list[bytes] = []
    half = 0.5 / fps
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:  # a truncated MP4 can open with no stream at all
                raise SkipEpisode(f"{what}: {path}: no video stream ({path.stat().st_size} bytes: a "
                                  "truncated or incomplete file?); re-download or re-encode it")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            tb = stream.time_base or Fraction(1, 1)
            if start_s > 0:  # seek lands on the keyframe at or before the target
                container.seek(int((start_s - half) / tb), stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                ts = float(frame.pts * tb)
                target = start_s + len(frames) * stride / fps
                if ts < target - half:
                    continue
                if ts > target + half:
                    raise SkipEpisode(f"{what}: {path}: no frame at {target:.3f} s (next frame at "
                                      f"{ts:.3f} s): the video has a gap or another frame rate "
                                      f"than {fps} fps ({fps_from})")
                frames.append(encode_jpeg(resize_with_pad(frame.to_ndarray(format="rgb24"), image_size)))
                if len(frames) == num_frames:
                    return frames
    # FFmpegError: what libav reports; OSError / ValueError / EOFError: a container or frame PyAV
    # itself cannot make sense of (a damaged header, a zero-size frame).
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as e:
        raise SkipEpisode(f"{what}: {path}: cannot decode ({type(e).__name__}: {e}); re-download or "
                          "re-encode it") from None
    raise SkipEpisode(f"{what}: {path}: video ends after {len(frames)} of {num_frames} frames "
                      f"(from {start_s:.3f} s, {fps} fps, stride {stride}); the video is shorter than the episode")


# ------------------------------------------------------------------------------------ runner
_worker_convert: Callable[[Any], Episode] | None = None


def _worker_init(convert: Callable[[Any], Episode], limit_threads: bool = False) -> None:
    global _worker_convert
    _worker_convert = convert
    if limit_threads:
        # One decoding process per core is the parallelism; BLAS threads inside each worker only
        # oversubscribe the cores (a worker spun 15 min in a 4x4 np.linalg.inv at load 30).
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)


def _worker_run(locator: Any) -> Episode | str:
    assert _worker_convert is not None
    try:
        return _worker_convert(locator)
    except SkipEpisode as e:
        return str(e)


def _results(convert: Callable[[Any], Episode], locators: list[Any], workers: int):
    """Converted episodes (or skip reasons) in input order; at most 2 * workers in flight."""
    if workers <= 1:
        _worker_init(convert)
        for loc in locators:
            yield _worker_run(loc)
        return
    # forkserver: workers start from a clean process, not a copy of a parent holding decoder
    # and BLAS thread state (about 1 s of imports per worker).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([convert.__module__])  # imported once, in the server
    with context.Pool(workers, initializer=_worker_init, initargs=(convert, True)) as pool:
        pending: deque = deque()
        for loc in locators:
            pending.append(pool.apply_async(_worker_run, (loc,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def run_import(out_dir: str | Path, episodes: list[SourceEpisode], convert: Callable[[Any], Episode],
               generator: dict[str, Any], *, overwrite: bool = False, workers: int = 1,
               shard_bytes: int, progress: bool = True, label: str = "import") -> ImportReport:
    """Convert ``episodes`` in order into the shard set ``out_dir`` (module docstring)."""
    start = time.perf_counter()
    report = ImportReport()
    writer = ShardSetWriter(out_dir, target_shard_bytes=shard_bytes, generator=generator,
                            overwrite=overwrite, resumable=True)
    resumed = writer.resumed_progress or {"next": 0, "skipped": []}
    report.resumed_from, report.skipped = int(resumed["next"]), list(resumed["skipped"])
    if report.resumed_from:
        log.info("%s: resuming at source episode %d of %d (%d written, %d skipped before)", label,
                 report.resumed_from, len(episodes), writer.num_episodes, len(report.skipped))
    todo = episodes[report.resumed_from:]
    with writer:
        results = _results(convert, [e.locator for e in todo], workers)
        bar = tqdm(zip(todo, results), total=len(episodes), initial=report.resumed_from, desc=label,
                   unit="ep", disable=not progress)
        for index, (src, result) in enumerate(bar, start=report.resumed_from):
            if isinstance(result, str):
                log.warning("%s: skipped %s: %s", label, src.name, result)
                report.skipped.append({"episode": src.name, "reason": result})
            else:
                writer.write(result, progress={"next": index + 1, "skipped": list(report.skipped)})
                report.frames += result.num_steps * max(1, len(result.frames))
            bar.set_postfix(written=writer.num_episodes, skipped=len(report.skipped))
        report.written = writer.num_episodes
        if report.written == 0:
            raise ImportRefused(f"{label}: none of the {len(episodes)} source episodes could be "
                                f"imported ({len(report.skipped)} skipped; first: "
                                f"{report.skipped[0] if report.skipped else 'none listed'})")
        writer.generator["skipped"] = report.skipped
        report.manifest = writer.finish()
    report.seconds = time.perf_counter() - start
    log.info("%s: %d episodes written, %d skipped, %d frames in %.1f s", label, report.written,
             len(report.skipped), report.frames, report.seconds)
    return report
