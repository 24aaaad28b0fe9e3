"""Write episodes into a shard set: tars rolled over by size, manifest rows, streaming norm stats.

Layout and file formats: data_shards/manifest.py (manifest) and data_shards/stats.py (norm stats).

Atomic finish. Every file is first written under a ``*.partial`` name. ``finish()`` closes and
fsyncs the shards, renames them to ``shard-NNNNNN.tar``, writes ``norm_stats.json``,
``episode_keys.json`` (each shard's keys: the reader's cross-shard duplicate check) and, last,
``manifest.json`` (each via a temp name + rename). A writer that dies midway therefore leaves no
manifest.json, and tools treat such a directory as incomplete. Leaving the ``with`` block by an
exception deletes the partial files. ``overwrite=True`` first deletes an existing manifest (the old
set is invalid from then on) and, at finish, the old shards the new manifest does not list.

Resumable writes (``resumable=True``, used by ``megavla data import``). Each closed shard is
committed: fsynced, kept as ``*.partial``, and listed in ``journal.json`` (atomic rewrite) together
with the caller's ``progress`` token of the last episode in it. A killed or failed write leaves the
committed shards and the journal; the next writer on that directory with the same ``generator``
and shard size checks each committed shard's size and sha256, feeds its episodes to the norm stats
again (same order -> the same stats), and exposes the token as ``resumed_progress`` so the caller
continues after that episode. Only the uncommitted (open) shard is redone, so no episode is written
twice and the finished set is byte-identical to an uninterrupted write.

One tar sample per episode: the reader decodes an episode once and draws several timesteps from it
(``data.samples_per_episode``); per-step samples would repeat state/actions/meta per step.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import webdataset as wds

from megavla.fileio import sha256_file

from .format import FORMAT_VERSION, Episode, episode_to_sample, sample_to_episode
from .manifest import (EPISODE_KEYS_FILE, MANIFEST_FILE, MANIFEST_VERSION, SHARD_GLOB, SHARD_PATTERN,
                       encode_episode_keys, shard_row, totals)
from .stats import NORM_STATS_FILE, NormStatsAccumulator, write_json_atomic

JOURNAL_FILE = "journal.json"
JOURNAL_VERSION = 1

log = logging.getLogger(__name__)

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads the archive to a multiple of this
DEFAULT_SHARD_BYTES = 64 * 2**20


class JournalError(FileExistsError):
    """An unfinished resumable write cannot be continued; the message says why and what to do."""



def _write_bytes_atomic(path: Path, data: bytes) -> None:
    from megavla.fileio import atomic_write_bytes   # the project's one atomic writer
    atomic_write_bytes(path, data)


class _HashingFile:
    """File wrapper that hashes and counts what tarfile streams through it."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.file.write(data)

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def tar_sample_bytes(sample: dict[str, Any]) -> int:
    """Bytes a sample adds to a ustar archive: a header block per member + data padded to 512."""
    return sum(TAR_BLOCK + -(-len(v) // TAR_BLOCK) * TAR_BLOCK
               for k, v in sample.items() if not k.startswith("__"))


class ShardSetWriter:
    """``with ShardSetWriter(dir) as w: w.write(episode) ...`` -> a complete shard set.

    ``target_shard_bytes``: a new shard starts when the next episode would push the current one
    past it (a single larger episode gets a shard of its own). ``generator`` is stored verbatim in
    the manifest. ``stats_kwargs`` go to NormStatsAccumulator (num_bins, min_range, min_std).
    """

    def __init__(self, out_dir: str | os.PathLike, target_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 generator: dict[str, Any] | None = None, overwrite: bool = False,
                 resumable: bool = False, **stats_kwargs: Any):
        if target_shard_bytes <= 0:
            raise ValueError(f"target_shard_bytes={target_shard_bytes} must be positive")
        self.out_dir = Path(out_dir)
        self.target_shard_bytes = int(target_shard_bytes)
        self.generator = dict(generator or {})
        self.stats = NormStatsAccumulator(**stats_kwargs)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        manifest = self.out_dir / MANIFEST_FILE
        if manifest.exists():
            if not overwrite:
                raise FileExistsError(f"{self.out_dir}: already holds a shard set ({MANIFEST_FILE}); "
                                      "choose another directory or pass overwrite (--overwrite)")
            manifest.unlink()  # from here on the old set is invalid, never half-replaced
            log.info("%s: overwriting the existing shard set", self.out_dir)
        self.resumable = resumable
        self.resumed_progress: Any = None
        self._progress: Any = None
        self._rows: list[dict[str, Any]] = []
        self._done_partials: list[tuple[Path, Path]] = []
        self._keys: set[str] = set()
        self._keys_per_shard: dict[str, list[str]] = {}  # -> episode_keys.json
        self._combos: dict[str, set[str]] = {}
        self._steps: dict[str, int] = {}
        journal = self.out_dir / JOURNAL_FILE
        if journal.exists() and (overwrite or not resumable):
            log.info("%s: discarding the journal of an earlier unfinished write", self.out_dir)
            journal.unlink()
        elif journal.exists():
            self._restore(journal)
        keep = {p for p, _ in self._done_partials}
        stale = sorted(p for p in self.out_dir.glob("*.partial") if p not in keep)
        if stale:
            log.warning("%s: removing %d *.partial files of an earlier unfinished write",
                        self.out_dir, len(stale))
            for p in stale:
                p.unlink()
        self._file: _HashingFile | None = None
        self._tar: wds.TarWriter | None = None
        self._shard_episodes: list[dict[str, Any]] = []
        self._shard_estimate = 0
        self._pending_progress: Any = None
        self.finished = False

    def _restore(self, journal: Path) -> None:
        """Adopt the committed shards of an earlier unfinished write (module docstring)."""
        from .verify import iter_tar_samples  # verify imports simplejpeg: only when resuming

        try:
            state = json.loads(journal.read_text())
        except ValueError as e:
            raise JournalError(f"{journal}: not valid JSON ({e}); delete {self.out_dir} or pass "
                               "--overwrite to start over") from None
        wanted = {"version": JOURNAL_VERSION, "generator": self.generator,
                  "target_shard_bytes": self.target_shard_bytes}
        differs = [k for k, v in wanted.items() if state.get(k) != v]
        if differs:
            raise JournalError(
                f"{journal}: an unfinished write with other settings is in {self.out_dir} (differs in "
                f"{differs}: was {[state.get(k) for k in differs]}, now {[wanted[k] for k in differs]}); "
                "rerun with the same arguments to resume, or pass --overwrite to start over")
        for row in state["shards"]:
            partial = self.out_dir / (row["path"] + ".partial")
            if not partial.is_file() or partial.stat().st_size != row["bytes"] \
                    or sha256_file(partial) != row["sha256"]:
                raise JournalError(f"{partial}: committed shard missing or changed since it was "
                                   f"journaled in {journal}; pass --overwrite to start over")
            problems: list = []
            shard_keys = self._keys_per_shard.setdefault(row["path"], [])
            for sample in iter_tar_samples(partial, problems):
                ep = sample_to_episode(sample, where=str(partial))
                self.stats.add(ep)
                self._keys.add(ep.key)
                shard_keys.append(ep.key)
                self._combos.setdefault(ep.embodiment, set()).add(ep.combo)
                self._steps[ep.embodiment] = self._steps.get(ep.embodiment, 0) + ep.num_steps
            if problems:
                raise JournalError(f"{partial}: {problems[0]}; pass --overwrite to start over")
            self._rows.append(row)
            self._done_partials.append((partial, self.out_dir / row["path"]))
        self.resumed_progress = state.get("progress")
        log.info("%s: resuming an unfinished write: %d committed shards, %d episodes", self.out_dir,
                 len(self._rows), len(self._keys))

    def _write_journal(self) -> None:
        write_json_atomic(self.out_dir / JOURNAL_FILE, {
            "version": JOURNAL_VERSION, "generator": self.generator,
            "target_shard_bytes": self.target_shard_bytes, "shards": self._rows,
            "progress": self._progress})

    @property
    def num_episodes(self) -> int:
        return len(self._keys)

    def has_episode(self, key: str) -> bool:
        return key in self._keys

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> "ShardSetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self.finished:
                self.finish()
        else:
            self.abort()

    # -- writing ---------------------------------------------------------------------------------
    def write(self, ep: Episode, progress: Any = None) -> None:
        """Add one episode. ``progress``: a JSON value saying where the caller's source stands
        after this episode; a resumable writer journals it when the episode's shard is committed."""
        if self.finished:
            raise RuntimeError(f"{self.out_dir}: write() after finish()")
        if ep.key in self._keys:
            raise ValueError(f"{self.out_dir}: duplicate episode key {ep.key!r} (embodiment, scene, "
                             "task and episode index must be unique within a shard set)")
        sample = episode_to_sample(ep)  # validates shapes, dtypes, finiteness
        size = tar_sample_bytes(sample)
        if self._tar is not None and self._shard_episodes and \
                self._shard_estimate + size + 2 * TAR_BLOCK > self.target_shard_bytes:
            self._close_shard()
        if self._tar is None:
            self._open_shard()
        self._tar.write(sample)
        self._shard_estimate += size
        self.stats.add(ep)
        self._keys.add(ep.key)
        valid_steps = int(ep.step_valid.sum())
        self._shard_episodes.append({"key": ep.key, "embodiment": ep.embodiment, "combo": ep.combo,
                                     "steps": ep.num_steps, "valid_steps": valid_steps})
        self._combos.setdefault(ep.embodiment, set()).add(ep.combo)
        self._steps[ep.embodiment] = self._steps.get(ep.embodiment, 0) + ep.num_steps
        self._pending_progress = progress

    def _open_shard(self) -> None:
        name = SHARD_PATTERN.format(len(self._rows))
        self._partial = self.out_dir / (name + ".partial")
        self._file = _HashingFile(self._partial)
        # mtime 0 and fixed user/group: the same episodes give byte-identical shards.
        self._tar = wds.TarWriter(self._file, mtime=0, user="megavla", group="megavla", encoder=False)
        self._shard_episodes, self._shard_estimate = [], 0

    def _close_shard(self) -> None:
        assert self._tar is not None and self._file is not None
        self._tar.close()
        self._file.close()
        name = SHARD_PATTERN.format(len(self._rows))
        row = shard_row(name, self._shard_episodes, self._file.bytes, self._file.sha256.hexdigest())
        self._rows.append(row)
        self._keys_per_shard[name] = [e["key"] for e in self._shard_episodes]
        self._done_partials.append((self._partial, self.out_dir / name))
        if self.resumable:  # commit point: the shard is fsynced, now make it count
            self._progress = self._pending_progress
            self._write_journal()
        log.debug("%s: closed %s (%d episodes, %d bytes)", self.out_dir, name, row["episodes"], row["bytes"])
        self._tar, self._file = None, None

    # -- finishing -------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Close the last shard, rename partials, write norm_stats.json then manifest.json."""
        if self.finished:
            raise RuntimeError(f"{self.out_dir}: finish() called twice")
        if self._tar is not None:
            self._close_shard()
        if not self._rows:
            log.warning("%s: finishing a shard set with no episodes", self.out_dir)
        norm_stats = self.stats.finalize()
        for partial, final in self._done_partials:
            os.replace(partial, final)
        listed = {row["path"] for row in self._rows}
        for old in self.out_dir.glob(SHARD_GLOB):
            if old.name not in listed:
                log.info("%s: removing stale shard %s not in the new manifest", self.out_dir, old.name)
                old.unlink()
        write_json_atomic(self.out_dir / NORM_STATS_FILE, norm_stats)
        keys_bytes, keys_entry = encode_episode_keys({row["path"]: self._keys_per_shard[row["path"]]
                                                      for row in self._rows})
        _write_bytes_atomic(self.out_dir / EPISODE_KEYS_FILE, keys_bytes)
        manifest = {
            "format_version": MANIFEST_VERSION,
            "episode_format_version": FORMAT_VERSION,
            "shards": self._rows,
            "totals": totals(self._rows, self._combos, self._steps),
            "target_shard_bytes": self.target_shard_bytes,
            "episode_keys": keys_entry,
            "generator": self.generator,
        }
        write_json_atomic(self.out_dir / MANIFEST_FILE, manifest)  # last: marks the set complete
        (self.out_dir / JOURNAL_FILE).unlink(missing_ok=True)
        self.finished = True
        t = manifest["totals"]
        log.info("%s: wrote %d episodes (%d steps) in %d shards, %.1f MB", self.out_dir,
                 t["episodes"], t["steps"], t["shards"], t["bytes"] / 1e6)
        return manifest

    def abort(self) -> None:
        """Drop everything written so far (partial files); no manifest is written. A resumable
        writer keeps its committed shards and journal, so the next run continues from them."""
        if self._tar is not None:
            try:
                self._tar.close()
                self._file.close()
            except Exception:  # noqa: BLE001 - already failing; the file is deleted next anyway
                log.debug("closing a partial shard during abort failed", exc_info=True)
        paths = [] if self.resumable else [p for p, _ in self._done_partials]
        if self._file is not None or self._tar is not None:
            paths.append(self._partial)
        for p in paths:
            p.unlink(missing_ok=True)
        self._tar = self._file = None
        self.finished = True
        log.warning("%s: shard set write aborted; %d partial files removed, no manifest written%s",
                    self.out_dir, len(paths), f"; {len(self._done_partials)} committed shards kept for "
                    "a resume" if self.resumable else "")
