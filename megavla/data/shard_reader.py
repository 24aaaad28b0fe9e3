"""Reading episodes out of shard sets: manifests, a fast tar member iterator, per-source cursors.

Why not ``tarfile`` / webdataset's ``tar_file_iterator``: one tar sample holds a whole episode
(format.py), ~100-150 members for 30-50 steps x 3 cameras, and ``tarfile`` spent ~360 us per member
on this machine parsing the PAX headers webdataset's TarWriter writes -- ~50 ms per episode, 100x the
JPEG decoding a sample needs. :func:`iter_tar_members` parses the 512-byte headers directly (ustar +
PAX ``path``/``size`` + GNU long names; checksums verified, truncation detected) and does not even read
the JPEG frames: it records where they are (:class:`MemberRef`) and a sample reads (``pread``) only the
frames of its timestep. Samples are grouped by key as webdataset does (key = name up to the first dot
of the basename).
"""
from __future__ import annotations

import logging
import mmap
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from megavla.config.core import ConfigError
from megavla.data_shards.format import Episode, EpisodeFormatError, sample_to_episode
from megavla.data_shards.validate import (ShardSetError, check_shard_set, cross_shard_message,
                                          duplicate_key_message, no_key_list_message, open_regular_file,
                                          shard_file_problem, unused_frame_members, unused_frames_message)

from .mixture import combo_of_key

log = logging.getLogger(__name__)

# Skip reasons (logged as data/skipped_<reason>) and what was read (data/<name>).
SKIP_REASONS = ("bad_shard", "bad_sample", "bad_image", "duplicate_episode", "excluded_episode", "unused_frame")
READ_COUNTERS = ("episodes_read", "samples_read")
COUNTER_NAMES = SKIP_REASONS + READ_COUNTERS
RENAMED_COUNTERS = {"episodes": "episodes_read", "samples": "samples_read"}  # in states saved before
_BLOCK = 512
# Members whose offsets one cursor remembers across epochs (~100 bytes each: ~20 MB at the limit).
MEMBER_INDEX_LIMIT = 200_000
# Steps of accepted episodes one cursor keeps parsed: a set read for many epochs skips parsing and
# checking them again. Only episodes read through the member index are kept (their frames are the
# index's offsets, shared): the cost is the arrays, ~100-150 bytes a step (10-20 MB per cursor).
PARSED_EPISODE_LIMIT = 100_000
_ZERO_BLOCK = bytes(_BLOCK)


class DataError(RuntimeError):
    """Bad input met with data.on_bad_sample='fail', or a source that yields nothing usable."""


class TarFormatError(ValueError):
    """A shard is truncated or corrupt (bad header checksum, short data, no end-of-archive blocks)."""


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


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 encoding for large values
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_records(data: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


READ, REF, SKIP = 0, 1, 2


class MemberRef:
    """A tar member located but not read (a JPEG frame): ``read()`` copies its bytes out of the
    shard's read-only memory map when a sample needs them."""

    __slots__ = ("buf", "offset", "size")

    def __init__(self, buf, offset: int, size: int):
        self.buf, self.offset, self.size = buf, offset, size

    def read(self) -> bytes:
        return self.buf[self.offset : self.offset + self.size]

    def view(self) -> memoryview:
        """The bytes in place (no copy: a JPEG decoder reads them straight from the map)."""
        return memoryview(self.buf)[self.offset : self.offset + self.size]


def map_shard(path: str) -> mmap.mmap:
    """Read-only memory map of a shard (the writer renames finished shards into place, so a mapped
    file is never rewritten under the reader)."""
    problem = shard_file_problem(path)  # a FIFO would block open() forever
    if problem:
        raise TarFormatError(f"{path}: {problem}")
    fd = open_regular_file(path)  # O_NONBLOCK + fstat: a FIFO swapped in since the stat cannot block
    try:
        if os.fstat(fd).st_size == 0:
            raise TarFormatError(f"{path}: empty file")
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)


def read_members(group: dict[str, Any]) -> dict[str, Any]:
    """A group from member_index.EpisodeTemplate.header with its members read now (others as they are)."""
    unread = group.pop("__unread__", None)
    return group if unread is None else unread[0].fill(group, unread[1])


def split_member_name(name: str) -> tuple[str, str]:
    """'dir/key.head.0003.jpg' -> ('dir/key', 'head.0003.jpg'): webdataset's key/suffix convention
    (the key ends at the first dot of the basename)."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def iter_tar_members(buf, where: str, mode: Callable[[str, str], int] | None = None,
                     index: list | None = None) -> Iterator[tuple[str, str, Any]]:
    """Yield ``(key, suffix, data)`` for the regular files of a tar image (bytes or mmap), in order.
    ``mode(key, suffix)`` picks READ (data = bytes), REF (data = MemberRef) or SKIP (not yielded).
    ``index``: a list that gets ``(key, suffix, how, offset, size)`` of every yielded member.
    Raises TarFormatError on any damage (checksum, short data, missing end-of-archive blocks)."""
    pending: dict[str, str] = {}
    pos, end = 0, len(buf)
    while True:
        header = buf[pos : pos + _BLOCK]
        if len(header) < _BLOCK:
            raise TarFormatError(f"{where}: ends {'mid-header' if header else 'without end-of-archive blocks'}"
                                 f" at byte {pos} (truncated file?)")
        if header == _ZERO_BLOCK:
            return
        try:
            checksum = _number(header[148:156])
            try:  # the common case: 11 octal digits + NUL
                size = int(header[124:135], 8)
            except ValueError:
                size = _number(header[124:136])
        except ValueError:
            raise TarFormatError(f"{where}: unreadable tar header at byte {pos}") from None
        # The checksum is the byte sum with its own field read as spaces. Adler-32's low half is
        # 1 + byte sum mod 65521 (exact enough: a 512-byte sum is < 2 * 65521), ~10x faster than sum().
        if ((zlib.adler32(header) & 0xFFFF) - 1 - checksum - sum(header[148:156]) + 8 * 32) % 65521:
            raise TarFormatError(f"{where}: tar header checksum mismatch at byte {pos}")
        kind = header[156:157]
        if pending and kind not in (b"x", b"g"):
            size = int(pending.get("size", size))
        start = pos + _BLOCK
        pos = start + (size + _BLOCK - 1) // _BLOCK * _BLOCK
        if start + size > end:
            raise TarFormatError(f"{where}: member at byte {start} truncated ({end - start} of {size} bytes)")
        if kind in (b"x", b"L"):
            data = buf[start : start + size]
            if kind == b"x":
                pending.update(_pax_records(data))
            else:
                pending["path"] = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        name = pending.get("path") if pending else None
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if header[345] and header[257:262] == b"ustar":
                name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
        pending = {}
        if kind not in (b"0", b"\0", b"7"):
            continue
        key, suffix = split_member_name(name)
        how = READ if mode is None else mode(key, suffix)
        if index is not None and how != SKIP:
            index.append((key, suffix, how, start, size))
        if how == REF:
            yield key, suffix, MemberRef(buf, start, size)
        elif how == READ:
            yield key, suffix, buf[start : start + size]


def group_members(members: Iterator[tuple[str, str, Any]], where: str) -> Iterator[dict[str, Any]]:
    """Consecutive members sharing a key -> one sample dict (as webdataset's group_by_keys). A
    member already in the current sample starts a new sample with the same key (an episode written
    twice in a row): the cursor then skips it as a duplicate key, and so does `verify`."""
    current: dict[str, Any] | None = None
    for key, suffix, data in members:
        if current is None or key != current["__key__"] or suffix in current:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": where}
        current[suffix] = data
    if current is not None:
        yield current


def read_first_episode(path: str) -> tuple[Episode, str] | None:
    """The first episode of a shard (frames located, not read), or None when it does not parse:
    build_loader checks it against the stats to refuse a set whose stats do not fit, at start."""
    try:
        mode = lambda key, suffix: REF if suffix.endswith(".jpg") else READ  # noqa: E731
        group = next(group_members(iter_tar_members(map_shard(path), path, mode), path))
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
        from .member_index import episode_templates   # imports this module
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
