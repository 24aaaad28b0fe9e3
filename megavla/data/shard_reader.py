"""Reading episodes out of shard sets: manifests, per-source cursors over the shards' episodes.

The tar walk and the grouping of members into episodes are data_shards/tar_reader.py, shared with
`megavla data verify` and the other shard readers; this module adds the training reader's part: which
members to read or only locate per episode (``ShardCursor.member_mode``), the skip counters, and the
remembered member walk of a shard (member_index.py) that later epochs reuse.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from megavla.config.core import ConfigError
from megavla.data_shards.format import Episode, EpisodeFormatError, sample_to_episode
from megavla.data_shards.tar_reader import (READ, REF, SKIP, TarFormatError, frames_located, group_members,
                                            iter_tar_members, map_shard)
from megavla.data_shards.validate import (ShardSetError, check_shard_set, cross_shard_message,
                                          duplicate_key_message, no_key_list_message, unused_frame_members,
                                          unused_frames_message)

from .member_index import episode_templates
from .mixture import combo_of_key

log = logging.getLogger(__name__)

# Skip reasons (logged as data/skipped_<reason>) and what was read (data/<name>).
SKIP_REASONS = ("bad_shard", "bad_sample", "bad_image", "duplicate_episode", "excluded_episode", "unused_frame")
READ_COUNTERS = ("episodes_read", "samples_read")
COUNTER_NAMES = SKIP_REASONS + READ_COUNTERS
RENAMED_COUNTERS = {"episodes": "episodes_read", "samples": "samples_read"}  # in states saved before
# Members whose offsets one cursor remembers across epochs (~100 bytes each: ~20 MB at the limit).
MEMBER_INDEX_LIMIT = 200_000
# Steps of accepted episodes one cursor keeps parsed: a set read for many epochs skips parsing and
# checking them again. Only episodes read through the member index are kept (their frames are the
# index's offsets, shared): the cost is the arrays, ~100-150 bytes a step (10-20 MB per cursor).
PARSED_EPISODE_LIMIT = 100_000


class DataError(RuntimeError):
    """Bad input met with data.on_bad_sample='fail', or a source that yields nothing usable."""


@dataclass
class ShardInfo:
    path: str
    episodes: int
    combos: list[str]
    embodiments: list[str]
    # Keys whose copy in this shard is skipped: an earlier shard holds them (episode_keys.json).
    # key -> the message verify prints for it. Every rank derives the same from the manifest.
    repeated: dict[str, str] = field(default_factory=dict)


def read_manifest(directory: str | Path, need_stats: bool = True, on_bad: str = "skip"
                  ) -> tuple[list[ShardInfo], dict | None]:
    """(shards, norm stats or None) of one set after the per-set checks `megavla data verify` runs
    (data_shards.validate.check_shard_set): a refused set is a ConfigError before any work starts.

    An episode key in two shards (from episode_keys.json, no shard opened): the later copies are
    skipped and counted ``duplicate_episode`` when their shard is read, so the run still starts and no
    episode is drawn twice as often; a shard holding only such copies is not read at all. With
    ``on_bad="fail"`` the set is refused instead. A set without episode_keys.json: a warning."""
    try:
        info = check_shard_set(directory, need_stats=need_stats)
    except ShardSetError as e:
        raise ConfigError(f"{e} (data.sources must name shard set directories written by `megavla data "
                          "synth` or a converter; `megavla data verify DIR` checks one)") from None
    directory = Path(directory)
    if info.episode_keys is None:
        log.warning("%s", no_key_list_message(directory))
    repeated: dict[str, dict[str, str]] = {}
    for dup in info.duplicates:
        repeated.setdefault(dup.later, {})[dup.key] = cross_shard_message(directory, dup)
    if info.duplicates:
        first = cross_shard_message(directory, info.duplicates[0])
        if on_bad == "fail":
            raise ConfigError(f"{first} [{len(info.duplicates)} keys repeated across shards; "
                              "data.on_bad_sample=fail refuses the set; 'skip' reads one copy of each]")
        log.warning("%s: %d episode keys are in more than one shard; each later copy is skipped and counted "
                    "as duplicate_episode when read, on every rank alike. First: %s", directory,
                    len(info.duplicates), first)
    shards = []
    for s in info.manifest["shards"]:
        mine = repeated.get(s["path"], {})
        if mine and len(mine) >= int(s["episodes"]):
            log.warning("%s: all %d episodes of %s are copies of episodes in earlier shards; the shard is "
                        "not read", directory, len(mine), s["path"])
            continue
        shards.append(ShardInfo(path=str(directory / s["path"]), episodes=int(s["episodes"]),
                                combos=list(s["combos"]), embodiments=sorted(s["embodiments"]), repeated=mine))
    return shards, info.norm_stats


def read_members(group: dict[str, Any]) -> dict[str, Any]:
    """A group from member_index.EpisodeTemplate.header with its members read now (others as they are)."""
    unread = group.pop("__unread__", None)
    return group if unread is None else unread[0].fill(group, unread[1])


def read_first_episode(path: str) -> tuple[Episode, str] | None:
    """The first episode of a shard (frames located, not read), or None when it does not parse:
    build_loader checks it against the stats to refuse a set whose stats do not fit, at start."""
    try:
        group = next(group_members(iter_tar_members(map_shard(path), path, frames_located), path))
        return sample_to_episode(group, where=path), f"{path}:{group['__key__']}"
    except (TarFormatError, OSError, ValueError, StopIteration):  # the cursor will count it
        return None


class Counters:
    """Skip counters of one worker; every count of bad input is logged with its location."""

    def __init__(self, on_bad: str):
        self.on_bad, self.muted = on_bad, False
        self.values = {k: 0 for k in COUNTER_NAMES}

    def add(self, kind: str, n: int = 1) -> None:
        if not self.muted:
            self.values[kind] = self.values.get(kind, 0) + n

    def bad(self, kind: str, message: str, count: bool = True, n: int = 1, fail: bool = True) -> None:
        """Skip (or raise in fail mode). ``count=False``: another worker counts this same event.
        ``n``: members skipped at once; ``fail=False``: inside an episode that is still read (verify
        warns, it does not fail), so fail mode does not raise either."""
        if self.on_bad == "fail" and fail:
            raise DataError(f"{message} (data.on_bad_sample=fail; set it to 'skip' to count and skip)")
        if not self.muted and count:
            self.values[kind] = self.values.get(kind, 0) + n
            log.warning("skipped %s: %s [%s so far: %d]", kind, message, kind, self.values[kind])

    def load(self, values: dict[str, int]) -> None:
        self.values = {RENAMED_COUNTERS.get(k, k): int(v) for k, v in values.items()}


class ShardCursor:
    """One source's endless episode stream for one (rank, worker), positioned by (draw, offset).

    Draw ``d`` reads shard ``order_e[d % n]`` where ``order_e`` is the permutation of the slot's ``n``
    shards for epoch ``e = d // n`` from ``RNG(order_seed + [e])``; ``offset`` counts the tar groups
    (samples) already taken from it.
    """

    def __init__(self, name: str, shards: list[ShardInfo], order_seed: list[int], kept_combos: set[str],
                 accept: Callable[[Episode, str], None], counters: Counters,
                 counted_shards: set[str] | None = None):
        self.name, self.shards, self.order_seed = name, shards, order_seed
        self.kept_combos, self.accept, self.counters = kept_combos, accept, counters
        # Bad shards this slot counts: its own. When every slot reads every shard (fewer shards than
        # slots) only one slot counts each, so a bad shard counts once per epoch, not once per reader.
        self.counted_shards = counted_shards if counted_shards is not None else {s.path for s in shards}
        self.draw, self.offset = 0, 0
        self._groups: Iterator[dict] | None = None
        self._shard_keys: set[str] = set()  # keys of the current draw (rebuilt by seek's replay)
        self._path = ""
        self._repeated: dict[str, str] = {}  # of the current shard
        self._mode_key, self._mode_kept = "", True
        self._member_index: dict[str, list] = {}   # shard path -> its walked members (_iter_groups)
        self._indexed_members = 0
        # (shard path, key) -> the accepted, checked Episode (shards are immutable; episodes are not
        # modified by their readers); bounded by PARSED_EPISODE_LIMIT steps.
        self._parsed: dict[tuple[str, str], Episode] = {}
        self._parsed_steps = 0
        self._unused_counted: set[tuple[str, str]] = set()  # episodes whose unused frames were counted

    def position(self) -> dict[str, int]:
        return {"draw": self.draw, "offset": self.offset}

    def _shard_of_draw(self, draw: int) -> ShardInfo:
        n = len(self.shards)
        order = np.random.default_rng(self.order_seed + [draw // n]).permutation(n)
        return self.shards[int(order[draw % n])]

    def member_mode(self, key: str, suffix: str) -> int:
        """Kept episodes: frames located (REF, read when a sample needs them), the rest read.
        Excluded combos and copies of keys an earlier shard holds: only meta.json is read (cheap skip,
        still counted)."""
        if key != self._mode_key:  # one combo lookup per episode, not per member
            combo = combo_of_key(key[key.rfind("/") + 1 :])
            self._mode_key = key
            self._mode_kept = (combo is None or combo in self.kept_combos) and key not in self._repeated
        if not self._mode_kept:
            return READ if suffix == "meta.json" else SKIP
        return REF if suffix.endswith(".jpg") else READ

    def _iter_groups(self, path: str) -> Iterator[dict]:
        """The shard's groups. The first complete, undamaged walk of a shard is remembered (member
        names, offsets, sizes, grouped per episode: shards are immutable once written), so later epochs
        skip the header walk -- ~15 % of the reader's CPU per sample when a small set is read for many
        epochs -- and locate each camera's frames as one lazy sequence (member_index.py)."""
        buf = map_shard(path)
        cached = self._member_index.get(path)
        if cached is not None:
            for template in cached:
                yield template.header(buf, path)   # members read by next_episode if not parsed before
            return
        index: list = []
        yield from group_members(iter_tar_members(buf, path, self.member_mode, index), path)
        if self._indexed_members + len(index) <= MEMBER_INDEX_LIMIT:   # only a walk that reached the end
            self._member_index[path] = episode_templates(index)
            self._indexed_members += len(index)

    def seek(self, draw: int, offset: int) -> None:
        """Reopen shard ``draw`` and skip ``offset`` tar groups (the caller mutes the counters)."""
        self.draw, self.offset, self._groups = draw, 0, None
        while self.offset < offset and self.draw == draw:
            self._next_group()

    def _next_draw(self) -> None:
        self.draw, self.offset, self._groups = self.draw + 1, 0, None

    def _next_group(self) -> dict | None:
        """Next raw tar group of the current shard; None when the shard ended or broke (-> next draw)."""
        if self._groups is None:
            shard = self._shard_of_draw(self.draw)
            self._path, self._repeated = shard.path, shard.repeated
            self._mode_key = ""  # a shard may start with the key the last one ended with (a copy)
            self._groups = self._iter_groups(self._path)
            self._shard_keys = set()
        try:
            group = next(self._groups)
        except StopIteration:
            self._next_draw()
            return None
        except (TarFormatError, OSError, ValueError) as e:
            self.counters.bad("bad_shard", f"{self._path}: unreadable after {self.offset} samples ({e}); "
                                           "rest of the shard skipped", count=self._path in self.counted_shards)
            self._next_draw()
            return None
        self.offset += 1
        if group["__key__"] in self._shard_keys:
            group["__duplicate__"] = True
        self._shard_keys.add(group["__key__"])
        return group

    def next_episode(self) -> tuple[Episode, str]:
        empty_draws, last_draw = 0, self.draw
        while True:
            group = self._next_group()
            if self.draw != last_draw:
                empty_draws, last_draw = empty_draws + 1, self.draw
                if empty_draws > 2 * len(self.shards) + 2:
                    raise DataError(f"source {self.name!r}: {empty_draws} shard draws in a row gave no usable "
                                    "episode; check `megavla data verify` and the diversity/include settings")
            if group is None:
                continue
            where = f"{self._path}:{group.get('__key__', '?')}"
            key = group["__key__"]
            # Counted by the slot that owns the shard only: once per epoch, however many slots read it.
            owner = self._path in self.counted_shards
            if group.get("__duplicate__"):
                self.counters.bad("duplicate_episode", duplicate_key_message(self._path, key), count=owner)
                continue
            if key in self._repeated:
                self.counters.bad("duplicate_episode", self._repeated[key], count=owner)
                continue
            combo = combo_of_key(key[key.rfind("/") + 1 :])
            if combo is not None and combo not in self.kept_combos:
                self.counters.add("excluded_episode")
                continue
            ep = self._parsed.get((self._path, key))
            if ep is not None:
                return ep, where
            try:
                ep = sample_to_episode(read_members(group), where=self._path)
                if ep.combo not in self.kept_combos:
                    self.counters.add("excluded_episode")
                    continue
                self.accept(ep, where)
            except EpisodeFormatError as e:
                self.counters.bad("bad_sample", str(e))
                continue
            unused = unused_frame_members(group, ep)  # once per episode per reader: not per epoch or slot
            if unused and (self._path, key) not in self._unused_counted:
                self._unused_counted.add((self._path, key))
                self.counters.bad("unused_frame", unused_frames_message(self._path, key, ep, unused), count=owner,
                                  n=len(unused), fail=False)
            if group.get("__indexed__") and self._parsed_steps + ep.num_steps <= PARSED_EPISODE_LIMIT:
                self._parsed[self._path, key] = ep
                self._parsed_steps += ep.num_steps
            return ep, where
