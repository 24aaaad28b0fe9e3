"""``megavla data synth | import | inspect | stats | verify | view``: make, check and see shard sets.

``synth --out DIR`` writes one shard set per embodiment family, ``DIR/robot`` and ``DIR/human``
(layout: data_shards/manifest.py), so training mixes them with
``data.sources={robot: DIR/robot, human: DIR/human} data.mixture.human=0.5``. The other commands
take a shard set or a directory holding several.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import multiprocessing
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from megavla.data.set_summary import print_set_table, summarize
from megavla.data_shards.format import EMBODIMENT_IDS, EpisodeFormatError, sample_to_episode
from megavla.data_shards.manifest import (ManifestError, embodiment_family, find_shard_sets,
                                          load_manifest, shard_file_problem)
from megavla.data_shards.stats import (DEFAULT_NUM_BINS, NORM_STATS_FILE, NormStatsAccumulator,
                                       compare_norm_stats, write_json_atomic)
from megavla.data_shards.validate import ReadLimits
from megavla.data_shards.verify import Problem, iter_tar_samples, verify_shard_set

log = logging.getLogger(__name__)

DEFAULT_GENERATOR = "megavla.data_shards.synth:generate_episode"


# ---------------------------------------------------------------------------------------- synth
def _resolve(spec: str) -> Callable[..., Any]:
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"megavla data synth: --generator {spec!r} not importable ({e}); expected "
                         "MODULE:FUNCTION with the signature of data_shards.synth.generate_episode")


_worker_generate: Callable[..., Any] | None = None
_worker_kwargs: dict[str, Any] = {}


def _worker_init(spec: str, kwargs: dict[str, Any]) -> None:
    global _worker_generate, _worker_kwargs
    _worker_generate, _worker_kwargs = _resolve(spec), kwargs


def _worker_run(job: tuple[str, int, int, int]):
    assert _worker_generate is not None
    return _worker_generate(*job, **_worker_kwargs)


def synth(args: argparse.Namespace) -> int:
    from megavla.data_shards.writer import ShardSetWriter  # imports webdataset (and torch): only here

    embodiments = [e.strip() for e in args.embodiments.split(",") if e.strip()]
    unknown = [e for e in embodiments if e not in EMBODIMENT_IDS]
    if unknown or not embodiments:
        log.error("--embodiments: unknown %s; choose from %s", unknown, sorted(EMBODIMENT_IDS))
        return 2
    for name, value in (("scenes", args.scenes), ("tasks", args.tasks),
                        ("episodes-per-combo", args.episodes_per_combo), ("image-size", args.image_size)):
        if value <= 0:
            log.error("--%s=%d must be positive", name, value)
            return 2
    gen_kwargs: dict[str, Any] = {"image_size": args.image_size, "seed": args.seed}
    if args.cameras:
        gen_kwargs["cameras"] = tuple(c.strip() for c in args.cameras.split(","))
    _resolve(args.generator)  # fail before any work if the generator is missing
    jobs = [(emb, s, t, e) for emb in embodiments for s in range(args.scenes)
            for t in range(args.tasks) for e in range(args.episodes_per_combo)]
    families = sorted({embodiment_family(e) for e in embodiments})
    out = Path(args.out)
    start = time.perf_counter()
    writers = {}
    for fam in families:  # all created (and checked) before any is entered
        generator = {"generator": args.generator, "scenes": args.scenes, "tasks": args.tasks,
                     "episodes_per_combo": args.episodes_per_combo, "image_size": args.image_size,
                     "seed": args.seed, "cameras": args.cameras or "default",
                     "embodiments": [e for e in embodiments if embodiment_family(e) == fam]}
        try:
            writers[fam] = ShardSetWriter(out / fam, target_shard_bytes=int(args.shard_size_mb * 2**20),
                                          generator=generator, overwrite=args.overwrite)
        except FileExistsError as e:
            log.error("%s", e)
            return 2
    with ExitStack() as stack:
        for writer in writers.values():
            stack.enter_context(writer)
        if args.workers > 1:
            pool = stack.enter_context(multiprocessing.get_context().Pool(
                args.workers, initializer=_worker_init, initargs=(args.generator, gen_kwargs)))
            # imap keeps job order: shards are identical whatever the worker count.
            episodes = pool.imap(_worker_run, jobs, chunksize=max(1, min(8, len(jobs) // (4 * args.workers))))
        else:
            _worker_init(args.generator, gen_kwargs)
            episodes = map(_worker_run, jobs)
        for job, ep in tqdm(zip(jobs, episodes), total=len(jobs), desc="synth", unit="ep",
                            disable=args.no_progress):
            if (ep.embodiment, ep.scene, ep.task, ep.episode) != job:
                raise RuntimeError(f"generator returned {ep.key} for job {job}")
            writers[embodiment_family(ep.embodiment)].write(ep)
    elapsed = time.perf_counter() - start
    log.info("synth: %d episodes in %.1f s (%.1f episodes/s, %d workers)", len(jobs), elapsed,
             len(jobs) / elapsed, args.workers)
    print_set_table([out / fam for fam in families], [])
    import shlex   # quoted: the braces and spaces must reach the config parser as one word each
    sources = ", ".join(f"{fam}: {out / fam}" for fam in families)
    mixture = ", ".join(f"{fam}: {1 / len(families):.2g}" for fam in families)
    print(f"\ntrain on it with: {shlex.quote(f'data.sources={{{sources}}}')} "
          f"{shlex.quote(f'data.mixture={{{mixture}}}')}")
    return 0


# -------------------------------------------------------------------------------------- inspect
def _sets(root: str) -> tuple[list[Path], list[Path]]:
    complete, incomplete = find_shard_sets(root)
    for d in incomplete:
        log.warning("%s: shard files but no manifest.json: an unfinished or crashed write "
                    "(rerun the writer; readers refuse it)", d)
    if not complete:
        log.error("%s: no shard set (no manifest.json here or in subdirectories)", root)
    return complete, incomplete


def inspect(args: argparse.Namespace) -> int:
    sets, incomplete = _sets(args.dir)
    if not sets:
        return 1
    if args.json:
        print(json.dumps([summarize(s) for s in sets], indent=1))
    else:
        rows = print_set_table(sets, incomplete)
        if any(r["missing_shards"] or r["size_mismatch"] for r in rows):
            return 1
    return 0


# ---------------------------------------------------------------------------------------- stats
def recompute_stats(set_dir: Path, num_bins: int = DEFAULT_NUM_BINS,
                    progress: bool = True) -> tuple[dict[str, Any], list[Problem]]:
    """Norm stats from the shards on disk (manifest order, images not decoded); bad samples are
    skipped and returned as problems."""
    acc = NormStatsAccumulator(num_bins=num_bins)
    problems: list[Problem] = []
    rows = load_manifest(set_dir)["shards"]
    for row in tqdm(rows, desc=f"stats {set_dir.name}", unit="shard", disable=not progress):
        path = set_dir / row["path"]
        problem = shard_file_problem(path)  # missing, or a FIFO that would block open()
        if problem:
            problems.append(Problem(str(path), problem))
            continue
        for sample in iter_tar_samples(path, problems):
            if sample.get("__error__"):
                continue
            try:
                acc.add(sample_to_episode(sample, where=str(path)))
            except EpisodeFormatError as e:
                problems.append(Problem(str(path), str(e), key=sample["__key__"]))
    for p in problems:
        log.warning("stats: skipped: %s", p)
    return acc.finalize(), problems


def stats(args: argparse.Namespace) -> int:
    sets, _ = _sets(args.dir)
    if not sets:
        return 1
    bad = 0
    for set_dir in sets:
        new, problems = recompute_stats(set_dir, args.num_bins, progress=not args.no_progress)
        bad += len(problems)
        stored_path = set_dir / NORM_STATS_FILE
        stored = json.loads(stored_path.read_text()) if stored_path.is_file() else {}
        print(f"{set_dir}: recomputed over " + ", ".join(
            f"{emb} {e['num_episodes']} episodes / {e['num_steps']} valid steps" for emb, e in new.items())
            + (f"; {len(problems)} bad samples skipped" if problems else ""))
        if not stored:
            print(f"  no stored {NORM_STATS_FILE}")
        else:
            diffs = compare_norm_stats(stored, new)
            for emb in sorted(new):
                for name in ("state", "actions"):
                    parts = [f"{k} {diffs[f'{emb}.{name}.{k}']:.3g}" for k in ("mean", "std", "q01", "q99")]
                    qerr = max(new[emb][name]["quantile_error"])
                    print(f"  {emb:<12} {name:<8} max |stored - recomputed|: {', '.join(parts)} "
                          f"(quantile bin width <= {qerr:.3g})")
            print(f"  largest difference: {max(diffs.values()):.3g}")
        if args.write:
            write_json_atomic(stored_path, new)
            print(f"  wrote {stored_path}")
    return 1 if bad else 0


# --------------------------------------------------------------------------------------- verify
def verify(args: argparse.Namespace) -> int:
    sets, incomplete = _sets(args.dir)
    if not sets:
        return 1
    failed = bool(incomplete)
    # The reader's data.* settings that decide which episodes it reads (the rest are its defaults).
    limits = ReadLimits(normalization=args.normalization, max_abs_normalized=args.max_abs_normalized,
                        normalization_floor=args.normalization_floor)
    for set_dir in sets:
        report = verify_shard_set(set_dir, check_images=not args.no_images, progress=not args.no_progress,
                                  workers=args.workers, limits=limits)
        for p in report.problems:
            print(p)
        warned = len(report.problems) - len(report.errors)
        status = ("OK" if report.ok else f"{len(report.errors)} errors in {len(report.bad_shards)} shards") + (
            f" ({warned} warning{'s' if warned != 1 else ''} above)" if warned else "")
        print(f"{set_dir}: {report.shards} shards, {report.samples} samples, "
              f"{report.frames_decoded} JPEGs decoded: {status}")
        failed |= not report.ok
    for d in incomplete:
        print(f"ERROR {d}: incomplete shard set (no manifest.json)")
    return 1 if failed else 0


def convert(args: argparse.Namespace) -> int:
    from megavla.data_shards.convert import convert_v1_set
    manifest = convert_v1_set(args.dir, args.out, overwrite=args.overwrite)
    t = manifest["totals"]
    print(f"{args.out}: {t['episodes']} episodes, {t['steps']} steps in episode format "
          f"v{manifest['episode_format_version']}")
    return 0


# ----------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megavla data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="generate mini-world episodes into DIR/robot and DIR/human",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (one shard set per embodiment family)")
    p.add_argument("--scenes", type=int, default=8, help="scenes (visual contexts) per embodiment")
    p.add_argument("--tasks", type=int, default=6, help="tasks per scene")
    p.add_argument("--episodes-per-combo", type=int, default=4, help="episodes per scene x task combo")
    p.add_argument("--image-size", type=int, default=224, help="square camera images, pixels")
    p.add_argument("--seed", type=int, default=0, help="generator seed (same seed, same shards)")
    p.add_argument("--embodiments", default="robot/arm,human/ego", help="comma-separated embodiment names")
    p.add_argument("--cameras", default="", help="comma-separated; default: the generator's")
    p.add_argument("--shard-size-mb", type=float, default=64.0, help="target shard size (MiB)")
    p.add_argument("--workers", type=int, default=2, help="generator processes (<=1: in-process)")
    p.add_argument("--overwrite", action="store_true", help="replace existing shard sets in --out")
    p.add_argument("--generator", default=DEFAULT_GENERATOR, help="MODULE:FUNCTION making one Episode")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.set_defaults(func=synth)
    p = sub.add_parser("inspect", help="summary: episodes, steps, combos, bytes, shards")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.set_defaults(func=inspect)
    p = sub.add_parser("stats", help="recompute norm stats and compare with the stored file")
    p.add_argument("dir")
    p.add_argument("--write", action="store_true", help="replace the stored norm_stats.json")
    p.add_argument("--num-bins", type=int, default=DEFAULT_NUM_BINS)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=stats)
    p = sub.add_parser("verify", help="the reader's checks + sha256, parse every sample, decode every JPEG; "
                                      "exit 0 only when the reader would read every episode")
    p.add_argument("dir")
    defaults = ReadLimits()
    p.add_argument("--normalization", default=defaults.normalization, choices=("quantile", "zscore", "none"),
                   help="as data.normalization of the run that will read the set")
    p.add_argument("--normalization-floor", type=float, default=defaults.normalization_floor,
                   help="as data.normalization_floor")
    p.add_argument("--max-abs-normalized", type=float, default=defaults.max_abs_normalized,
                   help="as data.max_abs_normalized")
    p.add_argument("--no-images", action="store_true", help="skip JPEG decoding")
    p.add_argument("--workers", type=int, default=2, help="shards checked in parallel processes")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=verify)
    p = sub.add_parser("convert", help="rewrite a v1 shard set (axis-angle state) as v2 (6D rotation)")
    p.add_argument("dir", help="the v1 shard set (only read)")
    p.add_argument("--out", required=True, help="new directory for the v2 set")
    p.add_argument("--overwrite", action="store_true", help="replace an existing set in --out")
    p.set_defaults(func=convert)
    from megavla.data.import_cli import add_parser as add_import_parser

    add_import_parser(sub)
    from megavla.data.view import add_parser as add_view_parser

    add_view_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args) or 0)
    except (ManifestError, FileNotFoundError, NotADirectoryError) as e:
        log.error("%s", e)
        return 2
