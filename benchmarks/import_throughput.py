"""Import throughput: frames/s per core of `megavla data import` on the test fixtures scaled up.

    python benchmarks/import_throughput.py [--episodes 12] [--steps 100] [--size 224] [--workers 1 2]
    python benchmarks/import_throughput.py --rss 4 16 [--size 64]   # peak RSS vs dataset size

LeRobot: the committed fixture (tests/fixtures/lerobot_v30_tiny, written by lerobot 0.4.4) scaled
to ``--episodes`` x ``--steps`` frames with the same v3.0 schema (its parquet schemas are reused),
two cameras at ``--size`` px re-encoded as AV1 (libsvtav1, lerobot's default codec) into one shared
MP4 per camera, so decoding seeks per episode as in a real dataset. EgoDex: ``--episodes`` HDF5
files in the published schema (tests/helpers/hand_recordings.py writer, mini-world human motion
resampled to ``--steps`` frames) + H.264 MP4s at 30 fps, ``--size`` px. Each import runs the real
CLI path (run_import -> PyAV decode -> letterbox to 224 -> JPEG -> ShardSetWriter). A "frame" is
one decoded camera image; frames/s per core = frames / seconds / workers.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))

log = logging.getLogger("benchmarks.import_throughput")


def scaled_lerobot(out: Path, episodes: int, steps: int, size: int) -> int:
    """A v3.0 dataset like the fixture, ``episodes`` x ``steps`` frames; returns frames (all cameras)."""
    import av
    import pyarrow as pa
    from PIL import Image
    import pyarrow.parquet as pq

    import make_lerobot_fixture as made

    src = ROOT / "tests" / "fixtures" / "lerobot_v30_tiny"
    shutil.copytree(src / "meta", out / "meta")
    info = json.loads((src / "meta/info.json").read_text())
    data_schema = pq.read_schema(src / "data/chunk-000/file-000.parquet")
    ep_file = src / "meta/episodes/chunk-000/file-000.parquet"
    ep_schema = pq.read_schema(ep_file)
    n = episodes * steps
    ep_index = np.repeat(np.arange(episodes), steps)
    frame_index = np.tile(np.arange(steps), episodes)
    state = np.stack([made.expected_state(e, t) for e, t in zip(ep_index, frame_index)])
    columns = {"observation.state": pa.FixedSizeListArray.from_arrays(pa.array(state.ravel()), made.STATE_DIM),
               "action": pa.FixedSizeListArray.from_arrays(pa.array((state + 0.05).ravel()), made.STATE_DIM),
               "timestamp": pa.array(frame_index / made.FPS, pa.float32()), "frame_index": pa.array(frame_index),
               "episode_index": pa.array(ep_index), "index": pa.array(np.arange(n)),
               "task_index": pa.array(ep_index % 2)}
    (out / "data/chunk-000").mkdir(parents=True)
    pq.write_table(pa.table(columns, schema=data_schema), out / "data/chunk-000/file-000.parquet")
    old = pq.read_table(ep_file).to_pylist()[0]
    rows = []
    for e in range(episodes):
        row = dict(old)
        row.update({"episode_index": e, "length": steps, "tasks": [made.EPISODE_TASKS[e % 2]],
                    "dataset_from_index": e * steps, "dataset_to_index": (e + 1) * steps})
        for key in made.CAMERAS:
            row[f"videos/{key}/from_timestamp"] = e * steps / made.FPS
            row[f"videos/{key}/to_timestamp"] = (e + 1) * steps / made.FPS
        rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows, schema=ep_schema), out / ep_file.relative_to(src))
    for key in made.CAMERAS:
        info["features"][key]["shape"] = [size, size, 3]
        path = out / f"videos/{key}/chunk-000/file-000.mp4"
        path.parent.mkdir(parents=True)
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libsvtav1", rate=Fraction(made.FPS))
            stream.width = stream.height = size
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "30", "g": "2", "preset": "12"}  # lerobot's g=2, crf=30
            for e, t in zip(ep_index, frame_index):
                img = np.asarray(Image.fromarray(made.expected_image(key, int(e), int(t))).resize((size, size)))
                # texture, so the codec has real work (flat colours decode unrealistically fast)
                img = img + np.random.default_rng([int(e), int(t)]).integers(0, 30, img.shape, np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    info.update(total_episodes=episodes, total_frames=n)
    (out / "meta/info.json").write_text(json.dumps(info))
    return n * len(made.CAMERAS)


def scaled_egodex(out: Path, episodes: int, steps: int, size: int) -> int:
    from helpers.hand_recordings import write_egodex_episode

    from megavla.data_shards.synth import generate_episode

    frames = 0
    for i in range(episodes):
        ep = generate_episode("human/ego", i % 4, i % 3, i, image_size=size, seed=1)
        idx = np.minimum(np.arange(steps) * ep.num_steps // steps, ep.num_steps - 1)  # resample
        ep.hand_keypoints, ep.head_pose = ep.hand_keypoints[idx], ep.head_pose[idx]
        ep.frames = {"head": [ep.frames["head"][j] for j in idx]}
        write_egodex_episode(out / f"task_{i % 3}", i, ep, f"task {i % 3}")
        frames += steps
    return frames


def timed_import(kind: str, src: Path, out: Path, workers: int) -> float:
    from megavla.data.cli import main as data_main

    start = time.perf_counter()
    code = data_main(["import", kind, str(src), "--out", str(out), "--workers", str(workers),
                      "--no-progress", "--overwrite"])
    if code != 0:
        raise SystemExit(f"import {kind} failed with exit code {code}")
    return time.perf_counter() - start


RSS_SCRIPT = """
import resource, sys
from megavla.cli import setup_logging
from megavla.data.cli import main
setup_logging(30)
code = main(sys.argv[1:])
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def peak_rss_mb(kind: str, src: Path, out: Path) -> float:
    """Peak RSS of a fresh 1-worker import process (streaming: must not grow with the dataset)."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, "import", kind, str(src), "--out", str(out),
                           "--no-progress", "--workers", "1"], capture_output=True, text=True, check=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("MAXRSS_KB")][-1]
    return int(line.split()[1]) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=12)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--size", type=int, default=224, help="source video resolution (square)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rss", type=int, nargs="+", default=None,
                        help="instead: peak RSS of 1-worker imports of these episode counts")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.rss:
        print(f"peak RSS of `megavla data import` (1 worker), {args.steps} steps/episode, {args.size} px")
        print("| source | episodes | frames | peak RSS MB |\n|---|---|---|---|")
        with tempfile.TemporaryDirectory(prefix="import_rss_") as tmp:
            for kind, make in (("lerobot", scaled_lerobot), ("egodex", scaled_egodex)):
                for n in args.rss:
                    src = Path(tmp) / f"{kind}_{n}"
                    src.mkdir()
                    frames = make(src, n, args.steps, args.size)
                    print(f"| {kind} | {n} | {frames} | {peak_rss_mb(kind, src, Path(tmp) / f'out_{kind}_{n}'):.0f} |")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="import_bench_") as tmp:
        tmp = Path(tmp)
        sources = {"lerobot": (tmp / "lerobot", scaled_lerobot), "egodex": (tmp / "egodex", scaled_egodex)}
        for kind, (src, make) in sources.items():
            src.mkdir()
            frames = make(src, args.episodes, args.steps, args.size)
            for workers in args.workers:
                seconds = timed_import(kind, src, tmp / f"out_{kind}_{workers}", workers)
                rows.append((kind, workers, frames, seconds))
    print(f"host: {platform.node()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
          f"{args.episodes} episodes x {args.steps} steps, source {args.size} px -> 224 px JPEG")
    print("| source | workers | frames | seconds | frames/s | frames/s per core |")
    print("|---|---|---|---|---|---|")
    for kind, workers, frames, seconds in rows:
        print(f"| {kind} | {workers} | {frames} | {seconds:.1f} | {frames / seconds:.0f} | "
              f"{frames / seconds / workers:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
