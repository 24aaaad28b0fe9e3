"""The one tar reader of shard sets: the training loader, `megavla data verify` / `stats` /
`convert` / `view` and the tokenizer trainer all walk shards with :func:`iter_tar_members` and group
members into episodes with :func:`group_members`, so what `verify` vouches for is what the loader reads.

Why not ``tarfile`` / webdataset's ``tar_file_iterator``: one tar sample holds a whole episode
(format.py), ~100-150 members for 30-50 steps x 3 cameras, and ``tarfile`` spent ~360 us per member
on this machine parsing the PAX headers webdataset's TarWriter writes -- ~50 ms per episode, 100x the
JPEG decoding a sample needs. :func:`iter_tar_members` parses the 512-byte headers directly (ustar +
PAX ``path``/``size`` + GNU long names; checksums verified, truncation detected) and does not even read
the JPEG frames when asked not to: it records where they are (:class:`MemberRef`) and a sample reads
only the frames of its timestep. Samples are grouped by key as webdataset does (key = name up to the
first dot of the basename). Imports nothing of megavla.data (data_shards is the layer below it).
"""
from __future__ import annotations

import mmap
import os
import zlib
from typing import Any, Callable, Iterator

from .manifest import open_regular_file, shard_file_problem

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)


class TarFormatError(ValueError):
    """A shard is truncated or corrupt (bad header checksum, short data, no end-of-archive blocks)."""


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


def frames_located(key: str, suffix: str) -> int:
    """``mode`` for readers that parse episodes but need no image: JPEG frames located, not read."""
    return REF if suffix.endswith(".jpg") else READ
