"""Integrity check of a shard set: the reader's own checks (data_shards/validate.py) plus sizes +
sha256 vs the manifest, every sample parsed, every JPEG decoded.

Each problem names the shard, the sample key and the member where known, with the message the reader
logs when it skips or refuses the same thing. Errors make ``megavla data verify`` exit non-zero;
warnings (a stale file the manifest does not list, non-square frames) do not: exit 0 means the
reader would read every episode. Per set: validate.check_manifest_shards, norm stats
(validate/stats.check_norm_stats) covering the manifest's embodiments, no episode key in two shards
(from episode_keys.json as the reader checks it; by reading every shard in sets without that file),
each shard's keys equal to its list in episode_keys.json.
Per shard: a regular file; size and sha256 as in the manifest; the tar reads to its end with the
training reader's own parser and grouping (data_shards/tar_reader.py; a truncated tar is reported
after the last good member); every sample parses with
``format.sample_to_episode`` and passes ``validate.EpisodeValidator``; no key twice in the shard;
no members outside the episode format; every JPEG decodes; sample / step / embodiment counts equal
the manifest row. Frames an episode does not use (t >= its steps, a camera meta.json does not list)
are a warning naming the members: the reader counts them and reads the episode.
"""
from __future__ import annotations

import logging
import multiprocessing
import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import simplejpeg
from tqdm import tqdm

from megavla.fileio import sha256_file

from .format import ARRAY_KEYS, CAMERAS, EpisodeFormatError, sample_to_episode
from .manifest import EPISODE_KEYS_FILE, SHARD_GLOB, ManifestError, load_episode_keys, load_manifest
from .stats import NORM_STATS_FILE, NormStatsError, load_norm_stats
from .tar_reader import TarFormatError, group_members, iter_tar_members, map_shard
from .validate import (CrossShardDuplicate, EpisodeValidator, ReadLimits, ShardSetError, check_manifest_shards,
                       cross_shard_duplicates, cross_shard_message, duplicate_key_message, no_key_list_message,
                       shard_file_problem, stats_coverage_problem, unused_frame_members, unused_frames_message)

log = logging.getLogger(__name__)

_KNOWN_MEMBER = re.compile(r"^(meta\.json|(%s)\.npy|(%s)\.\d{4}\.jpg)$" % (
    "|".join(ARRAY_KEYS), "|".join(CAMERAS)))


@dataclass
class Problem:
    shard: str
    message: str
    key: str | None = None
    member: str | None = None
    severity: str = "error"  # "error" | "warning"

    def __str__(self) -> str:
        where = self.shard + (f" key={self.key}" if self.key else "") + (
            f" member={self.member}" if self.member else "")
        return f"{self.severity.upper()} {where}: {self.message}"


@dataclass
class VerifyReport:
    set_dir: str
    shards: int = 0
    samples: int = 0
    frames_decoded: int = 0
    problems: list[Problem] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # episode keys in read order (cross-shard check)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def bad_shards(self) -> list[str]:
        return sorted({p.shard for p in self.errors})

    @property
    def ok(self) -> bool:
        return not self.errors



def iter_tar_samples(path: Path, problems: list[Problem]) -> Iterator[dict[str, Any]]:
    """The shard's samples exactly as the training reader groups them (tar_reader.iter_tar_members +
    group_members: the same header walk, damage checks and key/suffix rule), every member read. A
    read error becomes a Problem naming the last good member, and the sample being read is yielded
    with ``__error__`` set."""
    where = str(path)
    last: list[tuple[str, str]] = []   # (key, member name) of the last member read
    failed: list[bool] = []

    def members() -> Iterator[tuple[str, str, Any]]:
        try:
            for key, suffix, data in iter_tar_members(map_shard(where), where):
                last[:] = [(key, f"{key}.{suffix}" if suffix else key)]
                yield key, suffix, data
        except (TarFormatError, OSError, ValueError) as e:
            after = f"after member {last[0][1]}" if last else "before the first member"
            detail = str(e).removeprefix(f"{where}: ")
            problems.append(Problem(where, f"unreadable tar {after}: {type(e).__name__}: {detail} "
                                    "(truncated or corrupt)", key=last[0][0] if last else None))
            failed.append(True)

    for sample in group_members(members(), where):
        if failed:   # the members ended at the damage: this is the sample it cut off
            sample["__error__"] = True
        yield sample


def _member_of(message: str, where: str, key: str) -> str | None:
    """The member an EpisodeFormatError names ("<where>:<key>.<member>: ..." or "missing member 'x'")."""
    missing = re.search(r"missing member '([^']+)'", message)
    if missing:
        return missing.group(1)
    prefix = f"{where}:{key}."
    return message[len(prefix):].split(": ", 1)[0] if message.startswith(prefix) else None


def _check_images(path: str, key: str, sample: dict[str, Any], report: VerifyReport) -> None:
    shapes: dict[str, tuple[int, ...]] = {}
    for member in sorted(k for k in sample if k.endswith(".jpg")):
        try:
            image = simplejpeg.decode_jpeg(sample[member])
        except Exception as e:  # noqa: BLE001 - simplejpeg raises ValueError/RuntimeError variants
            report.problems.append(Problem(path, f"JPEG does not decode ({e})", key=key, member=member))
            continue
        report.frames_decoded += 1
        cam = member.split(".", 1)[0]
        if cam not in shapes and image.shape[0] != image.shape[1]:
            report.problems.append(Problem(path, f"frames are {image.shape[1]}x{image.shape[0]} (WxH), not "
                                           "square: the reader letterboxes them to data.image_size "
                                           "(aspect kept, zero padding)", key=key, member=member,
                                           severity="warning"))
        if shapes.setdefault(cam, image.shape) != image.shape:
            report.problems.append(Problem(path, f"frame shape {image.shape} differs from this "
                                           f"camera's first frame {shapes[cam]} (each frame is resized "
                                           "on its own)", key=key, member=member, severity="warning"))


def verify_shard(path: Path, row: dict[str, Any], report: VerifyReport, check_images: bool = True,
                 check_sha: bool = True, validator: EpisodeValidator | None = None) -> None:
    """Integrity checks plus the reader's own per-episode checks (``validator``; built from the
    set's norm stats and the reader's default limits when None)."""
    where = str(path)
    validator = validator if validator is not None else EpisodeValidator(None, _NO_STATS_LIMITS)
    problem = shard_file_problem(path)
    if problem:
        report.problems.append(Problem(where, problem))
        return
    size = path.stat().st_size
    if size != row["bytes"]:
        report.problems.append(Problem(where, f"size {size} bytes, manifest says {row['bytes']}"))
    if check_sha:
        digest = sha256_file(path)
        if digest != row["sha256"]:
            report.problems.append(Problem(where, f"sha256 {digest[:16]}... != manifest "
                                           f"{row['sha256'][:16]}... (file changed or corrupt)"))
    samples = steps = 0
    embodiments: dict[str, int] = {}
    seen: set[str] = set()
    for sample in iter_tar_samples(path, report.problems):
        key = sample["__key__"]
        samples += 1
        if key in seen:
            report.problems.append(Problem(where, duplicate_key_message(where, key), key=key))
            continue
        seen.add(key)
        report.keys.append(key)
        for member in sample:
            if member.startswith("__"):
                continue
            if not member:   # a name without a dot: the reader groups it under its own name
                report.problems.append(Problem(where, "member name has no key.suffix form", key=key,
                                               member=key))
            elif not _KNOWN_MEMBER.match(member):
                report.problems.append(Problem(where, "member not in the episode format", key=key,
                                               member=member))
        if sample.get("__error__"):
            continue  # cut off by the read error already reported for this key
        try:
            ep = sample_to_episode(sample, where=where)
            validator.check(ep, f"{where}:{key}")
        except EpisodeFormatError as e:
            report.problems.append(Problem(where, str(e), key=key, member=_member_of(str(e), where, key)))
            continue
        steps += ep.num_steps
        embodiments[ep.embodiment] = embodiments.get(ep.embodiment, 0) + 1
        unused = unused_frame_members(sample, ep)
        if unused:  # the reader counts them (unused_frame) and reads the episode without them
            report.problems.append(Problem(where, unused_frames_message(where, key, ep, unused), key=key,
                                           member=unused[0], severity="warning"))
        if check_images:
            _check_images(where, key, sample, report)
    report.samples += samples
    if samples != row["samples"]:
        report.problems.append(Problem(where, f"{samples} samples read, manifest says {row['samples']}"))
    if not any(p.shard == where and p.severity == "error" for p in report.problems):
        if steps != row["steps"] or embodiments != row["embodiments"]:
            report.problems.append(Problem(where, f"steps {steps} / embodiments {embodiments} differ "
                                           f"from manifest {row['steps']} / {row['embodiments']}"))


# Without usable stats (already an error of the set) only what needs no stats is checked per episode.
_NO_STATS_LIMITS = ReadLimits(max_abs_normalized=float("inf"))


def _verify_job(job: tuple[str, dict[str, Any], bool, bool, dict | None, ReadLimits]) -> VerifyReport:
    path, row, check_images, check_sha, stats, limits = job
    report = VerifyReport(path)
    validator = EpisodeValidator(stats, limits if stats is not None else _NO_STATS_LIMITS)
    verify_shard(Path(path), row, report, check_images=check_images, check_sha=check_sha,
                 validator=validator)
    return report


def _compare_listed_keys(shard_report: VerifyReport, listed: list[str]) -> None:
    """The keys read from a shard must be those episode_keys.json lists for it: the reader trusts the
    list to find repeats across shards. Checked when the shard read without other errors."""
    if shard_report.errors:
        return
    read, want = set(shard_report.keys), set(listed)
    if read == want:
        return
    extra, absent = sorted(read - want), sorted(want - read)
    shard_report.problems.append(Problem(shard_report.set_dir, (
        f"episode keys differ from its list in {EPISODE_KEYS_FILE} ({len(extra)} read but not listed, "
        f"{len(absent)} listed but not read; first: {(extra or absent)[0]}): the shard was replaced or the "
        "list is stale, so repeats across shards cannot be trusted; write the set again")))


def verify_shard_set(set_dir: str | Path, check_images: bool = True, check_sha: bool = True,
                     progress: bool = False, workers: int = 1,
                     limits: ReadLimits = ReadLimits()) -> VerifyReport:
    """Check one shard set; ``workers`` > 1 checks shards in that many processes. ``limits``: the
    reader settings to check against (default: the reader's defaults)."""
    set_dir = Path(set_dir)
    report = VerifyReport(str(set_dir))
    try:
        manifest = load_manifest(set_dir)
    except ManifestError as e:
        report.problems.append(Problem(str(set_dir), str(e)))
        return report
    try:
        check_manifest_shards(set_dir, manifest)
    except ShardSetError as e:  # the reader refuses the whole set with this message
        report.problems.append(Problem(str(set_dir / "manifest.json"), str(e)))
    listed = None
    try:
        listed = load_episode_keys(set_dir, manifest)
    except ManifestError as e:  # the reader refuses the whole set with this message
        report.problems.append(Problem(str(set_dir / EPISODE_KEYS_FILE), str(e)))
    if listed is not None:  # the reader's own start check: same duplicates, same messages
        for dup in cross_shard_duplicates(listed):
            report.problems.append(Problem(str(set_dir / dup.later), cross_shard_message(set_dir, dup), key=dup.key))
    elif "episode_keys" not in manifest:
        report.problems.append(Problem(str(set_dir / "manifest.json"), no_key_list_message(set_dir),
                                       severity="warning"))
    stats = None
    try:
        stats = load_norm_stats(set_dir / NORM_STATS_FILE)
        problem = stats_coverage_problem(set_dir, manifest, stats)
        if problem:
            report.problems.append(Problem(str(set_dir / NORM_STATS_FILE), problem))
    except NormStatsError as e:
        report.problems.append(Problem(str(set_dir / NORM_STATS_FILE), str(e)))
    rows = manifest["shards"]
    for extra in sorted(p.name for p in set_dir.glob(SHARD_GLOB) if p.name not in {r["path"] for r in rows}):
        report.problems.append(Problem(str(set_dir / extra), "shard file not listed in manifest.json "
                                       "(ignored by readers)", severity="warning"))
    jobs = [(str(set_dir / row["path"]), row, check_images, check_sha, stats, limits) for row in rows]
    first_shard: dict[str, str] = {}
    with ExitStack() as stack:
        if workers > 1 and len(jobs) > 1:
            pool = stack.enter_context(multiprocessing.get_context().Pool(min(workers, len(jobs))))
            results = pool.imap(_verify_job, jobs)  # ordered: the report lists shards in manifest order
        else:
            results = map(_verify_job, jobs)
        for row, shard_report in zip(rows, tqdm(results, total=len(jobs), desc=f"verify {set_dir.name}",
                                                unit="shard", disable=not progress)):
            report.shards += 1
            report.samples += shard_report.samples
            report.frames_decoded += shard_report.frames_decoded
            if listed is not None:
                _compare_listed_keys(shard_report, listed[row["path"]])
            report.problems.extend(shard_report.problems)
            if listed is not None:
                continue
            for key in shard_report.keys:  # no key list: find repeats by reading, as the reader cannot
                if key in first_shard:
                    dup = CrossShardDuplicate(key, first_shard[key], row["path"])
                    report.problems.append(Problem(shard_report.set_dir, cross_shard_message(set_dir, dup, listed=False),
                                                   key=key))
                else:
                    first_shard[key] = row["path"]
    log.info("verify %s: %d shards, %d samples, %d frames decoded, %d errors, %d warnings", set_dir,
             report.shards, report.samples, report.frames_decoded, len(report.errors),
             len(report.problems) - len(report.errors))
    return report
