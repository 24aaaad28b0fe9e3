"""The one validator of shard sets, called by both `megavla data verify` and the streaming reader.

Both ask the same three questions, with the same code and the same messages, so they cannot disagree:

* per set (:func:`check_shard_set`, before any work): a readable manifest that lists at least one
  shard, every shard path inside the set (no absolute path, no ``..``) and listed once, no episode
  key in two shards (:func:`cross_shard_duplicates`, from ``episode_keys.json``: later copies are
  skipped, see there; sets written without that file warn that this cannot be checked), and, when
  the reader normalizes, a ``norm_stats.json`` that is finite, has ``q01 <= q99`` and ``std >= 0``
  and covers every embodiment the manifest lists. A failure here refuses the whole set.
* per shard file (:func:`shard_file_problem`, :func:`open_regular_file`): a regular file. A FIFO
  named like a shard would block ``open()`` forever; a directory or device is no tar either.
* per episode (:class:`EpisodeValidator`, after ``format.sample_to_episode``): the key not seen
  before in its shard, at least one valid step, instruction and subtasks encodable as UTF-8 (a lone
  surrogate is valid JSON but no tokenizer takes it), dims within ``data.max_*_dim`` and equal to
  the norm stats' dims, an embodiment the stats cover, and every value that reaches a batch (state
  and actions of valid steps, normalized as the reader normalizes them) finite and within
  ``data.max_abs_normalized``. A failure here skips the episode (counted ``bad_sample``, or
  ``duplicate_episode``), or raises in ``data.on_bad_sample=fail`` mode.

* per episode, after it is accepted (:func:`unused_frame_members`): JPEG members the episode does not
  use -- frame t >= its steps, or frames of a camera meta.json does not list -- are not read by
  anyone; `verify` warns about them (:func:`unused_frames_message`) and the reader counts them
  (``unused_frame``, once per member) and reads the episode as it is.

``verify`` adds the integrity checks a streaming reader cannot afford per read (sha256 and size
against the manifest, every JPEG decoded, members outside the format, counts against the manifest,
episode keys repeated across shards in sets without ``episode_keys.json``, each shard's keys equal to
its list), so ``verify`` exit 0 means every episode would be read.
Settings the reader takes from ``data.*`` come in :class:`ReadLimits`; ``verify`` uses the defaults.

numpy only: ``verify`` must not pay the torch import.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .format import ARRAY_KEYS, CAMERAS, Episode, EpisodeFormatError
# The regular-file helpers live in manifest.py (stats.py needs them too); they are part of this API.
from .manifest import (EPISODE_KEYS_FILE, ManifestError, file_kind, load_episode_keys, load_manifest,
                       open_regular_file, read_regular_text, shard_file_problem)
from .stats import NORM_STATS_FILE, NormStatsError, load_norm_stats, norm_affine

__all__ = ["EpisodeValidator", "ReadLimits", "ShardSetError", "ShardSetInfo", "StatsMismatchError",
           "CrossShardDuplicate", "check_manifest_shards", "check_shard_set", "cross_shard_duplicates",
           "cross_shard_message", "duplicate_key_message", "no_key_list_message", "file_kind",
           "open_regular_file", "read_regular_text", "shard_file_problem", "stats_coverage_problem",
           "unused_frame_members", "unused_frames_message"]

# Reader defaults; megavla.config.data.DataConfig has the same values (tests/test_shards_validate.py).
DEFAULT_NORMALIZATION = "quantile"
DEFAULT_NORMALIZATION_FLOOR = 1e-3
DEFAULT_MAX_ABS_NORMALIZED = 100.0
DEFAULT_MAX_DIM = 32


class StatsMismatchError(EpisodeFormatError):
    """The norm stats do not fit an episode's data (dims differ, or a dim the stats call constant
    varies): when the first episode of a set shows it, the reader refuses the set at start."""


class ShardSetError(ValueError):
    """A whole shard set is unusable (manifest, shard list or norm stats); names file, field, fix."""


@dataclass(frozen=True)
class ReadLimits:
    """The ``data.*`` settings that decide whether the reader can use an episode."""

    normalization: str = DEFAULT_NORMALIZATION
    normalization_floor: float = DEFAULT_NORMALIZATION_FLOOR
    max_abs_normalized: float = DEFAULT_MAX_ABS_NORMALIZED
    max_state_dim: int = DEFAULT_MAX_DIM
    max_action_dim: int = DEFAULT_MAX_DIM

    @classmethod
    def from_config(cls, cfg: Any) -> "ReadLimits":
        """From a megavla.config.data.DataConfig (duck-typed: this module does not import megavla)."""
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class CrossShardDuplicate:
    """An episode key that shard ``later`` holds although the earlier shard ``first`` (manifest order)
    holds it too: the copy in ``later`` is skipped."""

    key: str
    first: str
    later: str


@dataclass
class ShardSetInfo:
    set_dir: Path
    manifest: dict[str, Any]
    norm_stats: dict[str, Any] | None  # None when the reader does not normalize
    episode_keys: dict[str, list[str]] | None = None  # None: a set written without episode_keys.json
    duplicates: list[CrossShardDuplicate] = field(default_factory=list)


def check_manifest_shards(set_dir: Path, manifest: dict[str, Any]) -> None:
    """The shard list: not empty, each path listed once (load_manifest already refused paths that
    leave the set)."""
    where = set_dir / "manifest.json"
    rows = manifest["shards"]
    if not rows:
        raise ShardSetError(f"{where}: 'shards' is empty: the set holds no episodes (a writer that "
                            "finished without episodes); rewrite it or drop it from data.sources")
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        path = os.path.normpath(str(row["path"]))
        if path in seen:
            raise ShardSetError(f"{where}: shards[{i}].path={row['path']!r} is listed twice (also "
                                f"shards[{seen[path]}]): its episodes would be drawn twice as often")
        seen[path] = i


def cross_shard_duplicates(episode_keys: dict[str, list[str]]) -> list[CrossShardDuplicate]:
    """Keys held by more than one shard, each later copy once (shards in manifest order)."""
    first: dict[str, str] = {}
    repeats: list[CrossShardDuplicate] = []
    for path, keys in episode_keys.items():
        for key in dict.fromkeys(keys):  # a key twice in one shard is the per-episode check's
            if key in first:
                repeats.append(CrossShardDuplicate(key, first[key], path))
            else:
                first[key] = path
    return repeats


def cross_shard_message(set_dir: str | os.PathLike, dup: CrossShardDuplicate, listed: bool = True) -> str:
    """The message `verify` prints and the reader logs for one repeated key. ``listed=False``: a set
    without episode_keys.json, where only `verify` (reading every shard) can see the repeat."""
    where = f"{Path(set_dir) / dup.later}:{dup.key}"
    fix = "keep one copy: write the set again from its source (the writer refuses repeated keys)"
    if listed:
        return (f"{where}: episode key also in {dup.first}; this later copy is skipped so the episode is "
                f"not drawn twice as often ({EPISODE_KEYS_FILE} lists it in both shards); {fix}")
    return (f"{where}: episode key also in {dup.first}: the reader would draw it twice as often (this set "
            f"has no {EPISODE_KEYS_FILE}, so a reader cannot see repeats across shards); {fix}")


def no_key_list_message(set_dir: str | os.PathLike) -> str:
    return (f"{Path(set_dir) / 'manifest.json'}: no 'episode_keys' (set written before 2026-11-30): an "
            "episode key in two shards cannot be checked at start and would be read twice; run "
            f"`megavla data verify {set_dir}`, or write the set again to add {EPISODE_KEYS_FILE}")


def stats_coverage_problem(set_dir: Path, manifest: dict[str, Any], stats: dict[str, Any]) -> str | None:
    listed = {emb for row in manifest["shards"] for emb in row["embodiments"]}
    missing = sorted(listed - set(stats))
    if not missing:
        return None
    return (f"{set_dir / NORM_STATS_FILE}: no stats for embodiments {missing} that "
            f"{set_dir / 'manifest.json'} lists; recompute with `megavla data stats {set_dir} --write`")


def check_shard_set(set_dir: str | os.PathLike, need_stats: bool = True) -> ShardSetInfo:
    """Per-set checks (module docstring); ShardSetError names the file, field and fix."""
    set_dir = Path(set_dir)
    try:
        manifest = load_manifest(set_dir)
    except ManifestError as e:
        raise ShardSetError(str(e)) from None
    check_manifest_shards(set_dir, manifest)
    try:
        episode_keys = load_episode_keys(set_dir, manifest)
    except ManifestError as e:
        raise ShardSetError(str(e)) from None
    duplicates = cross_shard_duplicates(episode_keys) if episode_keys is not None else []
    stats = None
    if need_stats:
        try:
            stats = load_norm_stats(set_dir / NORM_STATS_FILE)
        except NormStatsError as e:
            raise ShardSetError(str(e)) from None
        problem = stats_coverage_problem(set_dir, manifest, stats)
        if problem:
            raise ShardSetError(problem)
    return ShardSetInfo(set_dir, manifest, stats, episode_keys, duplicates)


def duplicate_key_message(where: str, key: str) -> str:
    return (f"{where}:{key}: episode key seen before in this shard; the copy is skipped (a repeated "
            "episode would be drawn twice as often; the writer refuses duplicate keys)")


_FRAME_MEMBER = re.compile(r"(%s)\.([0-9]{4,})\.jpg" % "|".join(CAMERAS))
# Sample entries that are not frames: the reader's own keys and the episode's other members.
_NOT_FRAMES = ("__key__", "__url__", "__indexed__", "__frames__", "__duplicate__", "__unread__", "__error__",
               "meta.json", *(f"{name}.npy" for name in ARRAY_KEYS))


def unused_frame_members(sample: dict[str, Any], ep: Episode) -> list[str]:
    """Frame members (``<camera>.<t>.jpg``) of a parsed sample that ``ep`` does not use: t >= its
    steps, or a camera its meta.json does not list. ``sample`` is the raw group the episode came from
    (verify's bytes, or the reader's group whose ``"__frames__"`` sequences may run past the steps).
    Cheap when there are none (a count, no per-member work): the reader calls it per parsed episode."""
    located = sample.get("__frames__") or {}
    members = len(sample) - sum(name in sample for name in _NOT_FRAMES)
    if members + sum(len(refs) for refs in located.values()) == ep.num_steps * len(ep.frames):
        return []  # every frame member is one that sample_to_episode took
    unused = [f"{cam}.{t:04d}.jpg" for cam, refs in located.items() if cam in CAMERAS
              for t in range(ep.num_steps if cam in ep.frames else 0, len(refs))]
    for name in sample:
        match = _FRAME_MEMBER.fullmatch(name)
        if match and (match.group(1) not in ep.frames or int(match.group(2)) >= ep.num_steps
                      or len(match.group(2)) != 4):  # 'head.00003.jpg' is not frame 3's name
            unused.append(name)
    return sorted(unused)


def unused_frames_message(where: str, key: str, ep: Episode, members: list[str]) -> str:
    """What `verify` prints and the reader logs for :func:`unused_frame_members`."""
    shown = ", ".join(members[:6]) + (f", ... ({len(members) - 6} more)" if len(members) > 6 else "")
    return (f"{where}:{key}: {len(members)} JPEG member(s) not part of the episode ({ep.num_steps} steps, "
            f"cameras {sorted(ep.frames)}): {shown}; ignored, the episode is read without them (the writer "
            f"stores frames 0..{ep.num_steps - 1} of listed cameras only: the shard was edited or written by "
            "another tool; write the set again if they belong to it)")


def _text_problem(text: Any) -> str | None:
    if not isinstance(text, str):
        return f"is {type(text).__name__}, not a string"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"is not valid Unicode text ({e.reason} at character {e.start}: {text[e.start:e.end]!r})"
    return None


class EpisodeValidator:
    """Per-episode checks against one set's norm stats and the reader's limits; ``check`` raises
    EpisodeFormatError with ``<where>.<member>: <what>; <fix>``. Cost: one pass over state and
    actions per episode (no image is touched)."""

    def __init__(self, norm_stats: dict[str, Any] | None, limits: ReadLimits = ReadLimits()):
        self.limits, self.stats = limits, norm_stats
        self._affine: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        if norm_stats is not None and limits.normalization != "none":
            for emb, entry in norm_stats.items():
                for kind in ("state", "actions"):
                    center, scale, width = norm_affine(entry[kind], limits.normalization,
                                                       limits.normalization_floor)
                    # float64: a float32 value such as 3e38 cannot overflow here (no errstate, which
                    # cost a third of the check), and the bound is far below float32's range.
                    self._affine[(emb, kind)] = (center.astype(np.float64), scale.astype(np.float64), width)

    def check(self, ep: Episode, where: str) -> None:
        lim = self.limits
        if not ep.step_valid.any():
            raise EpisodeFormatError(f"{where}.step_valid.npy: no valid step to sample "
                                     f"({ep.num_steps} steps, all marked invalid)")
        for name, text in [("instruction", ep.instruction)] + [
                (f"subtasks[{i}].text", s.text) for i, s in enumerate(ep.subtasks)]:
            problem = _text_problem(text)
            if problem:
                raise EpisodeFormatError(f"{where}.meta.json: {name} {problem}; fix the text in the "
                                         "converter that wrote it")
        S, A = ep.state.shape[1], ep.actions.shape[1]
        if S > lim.max_state_dim or A > lim.max_action_dim:
            raise EpisodeFormatError(f"{where}.state.npy/actions.npy: dims state={S} actions={A} exceed "
                                     f"data.max_state_dim={lim.max_state_dim} / "
                                     f"data.max_action_dim={lim.max_action_dim}")
        if self.stats is not None and lim.normalization != "none" and ep.embodiment not in self.stats:
            raise EpisodeFormatError(f"{where}.meta.json: embodiment {ep.embodiment!r} has no norm "
                                     f"stats in this set (stats have {sorted(self.stats)}); move the "
                                     "episode to a set of its embodiment")
        valid = ep.step_valid
        for kind, values in (("state", ep.state), ("actions", ep.actions)):
            self._check_values(ep, kind, values[valid], where)

    def _check_values(self, ep: Episode, kind: str, raw: np.ndarray, where: str) -> None:
        lim = self.limits
        member = f"{where}.{kind}.npy"
        affine = self._affine.get((ep.embodiment, kind))
        if affine is None:
            normalized = raw
        else:
            center, scale, width = affine
            if raw.shape[1] != center.shape[0]:
                raise StatsMismatchError(f"{member}: wrong shape, {raw.shape[1]} dims but the "
                                         f"{ep.embodiment} norm stats have {center.shape[0]}; the "
                                         "stats belong to other data: recompute them "
                                         "(`megavla data stats DIR --write`) or fix the episode")
            normalized = (raw - center) / scale  # the reader's map (float32 there)
        within = np.abs(normalized) <= lim.max_abs_normalized  # False for NaN/inf too
        if within.all():
            return
        bad = ~within
        step, dim = (int(i) for i in np.argwhere(bad)[0])
        what = "values" if affine is None else "normalized values"
        msg = (f"{member}: {int(bad.sum())} {what} of valid steps beyond +-{lim.max_abs_normalized:g} "
               f"(first: valid step {step}, dim {dim}, raw {float(raw[step, dim]):.4g} -> "
               f"{float(normalized[step, dim]):.4g})")
        if affine is not None and width[dim] < lim.normalization_floor:
            span = float(raw[:, dim].max() - raw[:, dim].min())
            raise StatsMismatchError(
                msg + f"; the {ep.embodiment} stats give dim {dim} the range {width[dim]:.3g} (below "
                f"data.normalization_floor={lim.normalization_floor:g}) but this episode spans {span:.4g} "
                "there: recompute the stats if they are stale (`megavla data stats DIR --write`); if the "
                "dim is a rare event (constant in 98% of steps), raise data.normalization_floor")
        raise EpisodeFormatError(msg + "; a corrupt or absurd value: fix the episode, or raise "
                                 "data.max_abs_normalized")
