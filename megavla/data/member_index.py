"""A shard's remembered member walk, grouped into episodes, with each camera's frames as one lazy
sequence: later epochs build an episode's raw sample without one object per tar member.

Why: an episode holds ~100-300 JPEG members (steps x cameras) of which a sample reads 3; building a
``MemberRef`` per member for every episode read, and then ``sample_to_episode``'s per-step lookup of
each ``cam.tttt.jpg`` member, cost ~35 us per sample (~4 % of the reader's CPU) for nothing.
:class:`FrameRefs` holds a camera's member offsets and makes the ``MemberRef`` of step t when a sample
asks for it. The raw sample gets them under ``"__frames__"`` (format.sample_to_episode reads that key;
everything else in the sample is as the tar walk gives it).
"""
from __future__ import annotations

import re
from typing import Any, Iterator

from megavla.data_shards.tar_reader import REF, MemberRef

_FRAME = re.compile(r"([^.]+)\.([0-9]+)\.jpg")


def _frame_of(suffix: str) -> tuple[str, int] | None:
    """'head.0003.jpg' -> ('head', 3): only the exact name format.episode_to_sample writes."""
    match = _FRAME.fullmatch(suffix)
    if match is None or len(match.group(2)) < 4 or (len(match.group(2)) > 4 and match.group(2)[0] == "0"):
        return None
    return match.group(1), int(match.group(2))


class FrameRefs:
    """Frames 0..n-1 of one camera located in a shard map; ``refs[t]`` is a MemberRef (read on demand)."""

    __slots__ = ("buf", "offsets", "sizes")

    def __init__(self, buf, offsets: tuple[int, ...], sizes: tuple[int, ...]):
        self.buf, self.offsets, self.sizes = buf, offsets, sizes

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, t):
        if isinstance(t, slice):
            return FrameRefs(self.buf, self.offsets[t], self.sizes[t])
        return MemberRef(self.buf, self.offsets[t], self.sizes[t])

    def __iter__(self) -> Iterator[MemberRef]:
        return (MemberRef(self.buf, o, n) for o, n in zip(self.offsets, self.sizes))


class EpisodeTemplate:
    """One tar group of a walked shard: its key, the members read as bytes or located one by one,
    and the cameras whose frames are exactly ``cam.0000.jpg`` .. ``cam.{n-1}.jpg`` (as offsets)."""

    __slots__ = ("key", "members", "cameras")

    def __init__(self, key: str, members: list[tuple[str, int, int, int]]):
        self.key = key
        frame_of = [_frame_of(suffix) if how == REF else None for suffix, how, _, _ in members]
        by_camera: dict[str, dict[int, tuple[int, int]]] = {}
        for (_, _, offset, size), frame in zip(members, frame_of):
            if frame is not None:
                by_camera.setdefault(frame[0], {})[frame[1]] = (offset, size)
        # A camera with a gap keeps its members one by one (the per-step lookup then reports what is
        # missing, exactly as for a walked shard).
        self.cameras = {cam: (tuple(frames[t][0] for t in range(len(frames))),
                              tuple(frames[t][1] for t in range(len(frames))))
                        for cam, frames in by_camera.items() if set(frames) == set(range(len(frames)))}
        self.members = [m for m, frame in zip(members, frame_of) if frame is None or frame[0] not in self.cameras]

    def sample(self, buf, where: str) -> dict[str, Any]:
        return self.fill({"__key__": self.key, "__url__": where, "__indexed__": True}, buf)

    def header(self, buf, where: str) -> dict[str, Any]:
        """The group's key only; its members are read when they are needed (a cursor that kept the
        episode parsed never needs them: ~25 us an episode of copies and dicts saved);
        shard_reader.read_members does."""
        return {"__key__": self.key, "__url__": where, "__indexed__": True, "__unread__": (self, buf)}

    def fill(self, group: dict[str, Any], buf) -> dict[str, Any]:
        for suffix, how, offset, size in self.members:
            group[suffix] = MemberRef(buf, offset, size) if how == REF else buf[offset : offset + size]
        if self.cameras:
            group["__frames__"] = {cam: FrameRefs(buf, offsets, sizes)
                                   for cam, (offsets, sizes) in self.cameras.items()}
        return group


def episode_templates(index: list[tuple[str, str, int, int, int]]) -> list[EpisodeTemplate]:
    """The walk's (key, suffix, how, offset, size) members grouped as tar_reader.group_members groups
    them: consecutive members of one key, a repeated suffix starting a new group."""
    templates: list[EpisodeTemplate] = []
    key, members, suffixes = None, [], set()
    for k, suffix, how, offset, size in index:
        if key is None or k != key or suffix in suffixes:
            if key is not None:
                templates.append(EpisodeTemplate(key, members))
            key, members, suffixes = k, [], set()
        members.append((suffix, how, offset, size))
        suffixes.add(suffix)
    if key is not None:
        templates.append(EpisodeTemplate(key, members))
    return templates
