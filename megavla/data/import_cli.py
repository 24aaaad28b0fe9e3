"""``megavla data import lerobot | egodex | keypoints SRC --out DIR``: real data into one shard set.

All three go through data_shards.importing.run_import (one resumable writer, norm stats as for
synth): rerun the same command after a crash to continue; ``--overwrite`` starts over.
A new source is one :func:`register_importer` call (its options and its plan), not a branch here.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from megavla.data.set_summary import print_set_table

log = logging.getLogger(__name__)


def _cameras(text: str) -> dict[str, str] | None:
    if not text:
        return None
    mapping = {}
    for part in text.split(","):
        cam, sep, key = part.partition("=")
        if not sep or not cam.strip() or not key.strip():
            raise SystemExit(f"--cameras: {part!r} is not CAMERA=KEY (e.g. head=observation.images.top)")
        mapping[cam.strip()] = key.strip()
    return mapping


@dataclass(frozen=True)
class ImportPlan:
    """What an importer found in SRC: the episodes to convert, the function converting one (it
    runs in worker processes, so module-level), and its settings for the set's generator record."""
    episodes: list[Any]
    convert: Callable[[Any], Any]
    settings: dict[str, Any]


@dataclass(frozen=True)
class Importer:
    """One `megavla data import KIND`: its help line, its own options (beside the shared SRC,
    --out, --image-size, --fps, --workers ...), and its plan(src, args) that checks SRC first."""
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    plan: Callable[[str, argparse.Namespace], ImportPlan]


IMPORTERS: dict[str, Importer] = {}


def register_importer(name: str, importer: Importer) -> None:
    """Add `megavla data import NAME`; a second importer of the same name is refused, not swapped in."""
    if name in IMPORTERS:
        raise ValueError(f"importer {name!r} is already registered ({IMPORTERS[name].plan.__module__})")
    IMPORTERS[name] = importer


# ---- the importers (their data_shards modules import pyarrow / av / h5py: loaded in plan only)

def _lerobot_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("--cameras", default="", help="CAMERA=KEY,... with CAMERA in head, "
                   "left_wrist, right_wrist and KEY a video or image feature (default: by name: "
                   "*wrist* -> right_wrist, *left*wrist* -> left_wrist, first other -> head)")
    q.add_argument("--state", default="observation.state", help="state feature key")
    q.add_argument("--action", default="action", help="action feature key")
    q.add_argument("--action-space", default="joint", choices=("joint", "ee"),
                   help="joint: actions as recorded (embodiment robot/joint); ee: --state is "
                        "[x,y,z,rx,ry,rz,gripper] and actions follow the EE convention (robot/arm)")
    q.add_argument("--scene", type=int, default=0, help="scene id for the scene x task combos")


def _lerobot_plan(src: str, args: argparse.Namespace) -> ImportPlan:
    from megavla.data_shards import import_lerobot
    opts, episodes = import_lerobot.plan(src, _cameras(args.cameras), args.state, args.action,
                                         args.action_space, args.fps, args.image_size, args.scene)
    return ImportPlan(episodes, import_lerobot.convert,
                      dict(cameras=opts.cameras, state=args.state, action=args.action,
                           action_space=args.action_space, scene=args.scene))


def _min_confidence_argument(q: argparse.ArgumentParser) -> None:
    q.add_argument("--min-confidence", type=float, default=0.5,
                   help="keypoints below this tracking confidence count as not tracked")


def _egodex_arguments(q: argparse.ArgumentParser) -> None:
    _min_confidence_argument(q)
    q.add_argument("--camera-axes", default="auto", choices=("auto", "arkit", "opencv"),
                   help="axes of transforms/camera (auto: the one with the hands in front)")


def _egodex_plan(src: str, args: argparse.Namespace) -> ImportPlan:
    from megavla.data_shards import import_egodex
    _, episodes = import_egodex.plan(src, args.fps, args.image_size, args.min_confidence, args.camera_axes)
    return ImportPlan(episodes, import_egodex.convert,
                      dict(min_confidence=args.min_confidence, camera_axes=args.camera_axes))


def _keypoints_plan(src: str, args: argparse.Namespace) -> ImportPlan:
    from megavla.data_shards import import_hands
    _, episodes = import_hands.plan_keypoints(src, args.fps or 10.0, args.image_size, args.min_confidence)
    return ImportPlan(episodes, import_hands.convert_keypoints, dict(min_confidence=args.min_confidence))


register_importer("lerobot", Importer(
    "a LeRobot dataset directory (format v3.0; v2.x too; frames as videos or as images in the parquet)",
    _lerobot_arguments, _lerobot_plan))
register_importer("egodex", Importer(
    "EgoDex: <task>/<n>.hdf5 + <n>.mp4 (3D hand skeleton, head camera)", _egodex_arguments, _egodex_plan))
register_importer("keypoints", Importer(
    "any hand tracker: <name>.npz (17 keypoints x 2 hands x T, head poses) + <name>.mp4",
    _min_confidence_argument, _keypoints_plan))


# ---- the command

def run(args: argparse.Namespace) -> int:
    from megavla.data_shards.importing import ImportRefused, run_import
    from megavla.data_shards.writer import JournalError

    src = str(Path(args.src).resolve())
    common: dict[str, Any] = {"importer": args.source, "source": src, "image_size": args.image_size,
                              "fps": args.fps}
    try:
        plan = IMPORTERS[args.source].plan(src, args)
        common.update(plan.settings)
        log.info("import %s: %d source episodes in %s", args.source, len(plan.episodes), src)
        report = run_import(args.out, plan.episodes, plan.convert, common, overwrite=args.overwrite,
                            workers=args.workers, shard_bytes=int(args.shard_size_mb * 2**20),
                            progress=not args.no_progress, label=f"import {args.source}")
    except ImportRefused as e:
        log.error("%s", e)
        return 1
    except JournalError as e:
        log.error("%s", e)
        return 2
    except FileExistsError as e:
        log.error("%s", e)
        return 2
    print_set_table([Path(args.out)], [])
    print(f"\nimported {report.written} episodes ({report.frames} frames, {report.seconds:.1f} s"
          + (f", resumed at source episode {report.resumed_from}" if report.resumed_from else "")
          + f"); skipped {len(report.skipped)}")
    for skip in report.skipped:
        print(f"  skipped {skip['episode']}: {skip['reason']}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="import LeRobot / EgoDex / hand-keypoint recordings into a shard set "
                                      "(resumable: rerun the same command to continue; --overwrite starts over)")
    kinds = p.add_subparsers(dest="source", required=True)
    for kind, importer in IMPORTERS.items():
        q = kinds.add_parser(kind, help=importer.help, description=importer.help)
        q.add_argument("src", help="source directory (keypoints: a directory of .npz or one .npz)")
        q.add_argument("--out", required=True, help="output shard set directory")
        q.add_argument("--image-size", type=int, default=224, help="frames letterboxed to N x N")
        q.add_argument("--fps", type=float, default=None,
                       help="output frame rate: an integer divisor of the source rate (default: the "
                            "source rate; keypoints: the rate of files without an 'fps' array, 10)")
        q.add_argument("--workers", type=int, default=1, help="decoding processes (output is identical)")
        q.add_argument("--shard-size-mb", type=float, default=64.0)
        q.add_argument("--overwrite", action="store_true",
                       help="replace a finished set (refused otherwise) or start an unfinished import over; "
                            "without it, rerunning the same command continues an unfinished import "
                            "(resumable by design)")
        q.add_argument("--no-progress", action="store_true")
        importer.add_arguments(q)
        q.set_defaults(func=run)
