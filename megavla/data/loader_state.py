"""The reader's resumable state: what it holds, and the checks before a restore.

``loader.state_dict()`` (one per rank; plain JSON types)::

    {"version": 1, "rank": r, "world_size": N, "num_workers": W, "batches_consumed": n,
     "stream": {...settings the stream depends on...},
     "workers": [<worker state> | None, ...]}          # one per logical worker (W, or 1 when W == 0)

A worker state (written by the worker after each batch it produced, adopted by the main process when
that batch is *consumed*, so batches prefetched but not consumed are not counted)::

    {"window": i, "pos": p,                       # shuffle window index, next item inside it
     "window_start": {"sources": {name: {"draw": d, "offset": k}},   # shard draw + tar groups read
                      "credits": {name: c}, "episodes": e},          # mixture credits, episode count
     "counters": {...}}                           # skip counters so far

Restore = for each source reopen shard draw ``d`` and skip ``k`` tar groups, rebuild window ``i``
(same RNG: the stream is a pure function of (seed, rank, world size, worker, window/episode index)),
and continue at item ``p``. See pipeline.py's docstring for the guarantee.
"""
from __future__ import annotations

from typing import Any

STATE_VERSION = 1


class LoaderStateError(ValueError):
    """A saved loader state does not fit the loader it is loaded into; the message names the field."""


def check_compatible(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise if ``saved`` (a state_dict) was written by a loader with different stream settings."""
    if not isinstance(saved, dict) or saved.get("version") != STATE_VERSION:
        raise LoaderStateError(f"loader state version {saved.get('version') if isinstance(saved, dict) else saved!r}"
                               f" is not {STATE_VERSION}; it was written by another reader version")
    for field in ("rank", "world_size", "num_workers"):
        if saved.get(field) != current[field]:
            raise LoaderStateError(
                f"loader state was saved with {field}={saved.get(field)}, this loader has "
                f"{field}={current[field]}; restore with the same data-parallel world size and "
                "data.num_workers (the shard split depends on them)")
    old, new = saved.get("stream", {}), current["stream"]
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise LoaderStateError(f"loader state stream setting {key!r} was {old.get(key)!r}, now "
                                   f"{new.get(key)!r}; a restore needs the same data settings and shards")
    workers = saved.get("workers")
    if not isinstance(workers, list) or len(workers) != len(current["workers"]):
        raise LoaderStateError(f"loader state has {len(workers) if isinstance(workers, list) else workers!r} "
                               f"worker states, this loader has {len(current['workers'])}")


def sum_counters(worker_states: list[dict[str, Any] | None]) -> dict[str, int]:
    total: dict[str, int] = {}
    for state in worker_states:
        for key, value in ((state or {}).get("counters") or {}).items():
            total[key] = total.get(key, 0) + int(value)
    return dict(sorted(total.items()))
