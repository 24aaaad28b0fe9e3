"""Per-embodiment normalization statistics, computed in one streaming pass over the episodes.

``norm_stats.json`` (one per shard set, next to ``manifest.json``)::

    {"<embodiment>": {                        e.g. "robot/arm", "human/ego"
        "state":   {"mean": [S], "std": [S], "q01": [S], "q99": [S], "count": [S], "quantile_error": [S]},
        "actions": {... the same keys, [A] each ...},
        "num_steps": n,                        valid steps (step_valid) that entered the state stats
        "num_episodes": n}}

The reader needs only ``mean/std/q01/q99``; ``count`` (values per dim that entered the stats) and
``quantile_error`` (the histogram bin width w of that dim, see below) are there to judge them.

What enters the statistics
    * Only valid steps (``step_valid``): tracker dropouts hold finite placeholders that must not
      pull the mean or the quantiles.
    * Actions: dim ``d`` of an episode enters only if ``action_mask[d]`` is True (supervised). Masked
      dims are kept in the file (same length as the action vector) so indices line up, but their
      placeholders (e.g. the human gripper, all zeros) never enter. A dim that no episode of the
      embodiment supervises gets the identity placeholder ``mean 0, std 1, q01 -1, q99 1`` with
      ``count 0`` (logged at INFO): normalizing it is harmless and the loss masks it anyway.

Degenerate ranges
    ``q99 - q01 < min_range`` (a constant dim) is widened symmetrically to ``min_range`` around its
    midpoint and ``std < min_std`` is raised to ``min_std``; each case logs a WARNING naming the
    embodiment, field and dim. Downstream divisions by ``q99 - q01`` or ``std`` therefore never blow
    up. Defaults: ``min_range = 1e-4``, ``min_std = 1e-5`` (well below any real action/state scale
    of the mini-world: metres, radians, gripper in [0, 1]).

Quantiles (q01 / q99): streaming histogram with power-of-two bin widths
    Each dim keeps ``num_bins`` (default 4096) counters over absolute, aligned bins
    ``[j*w, (j+1)*w)`` with ``w = 2**k``. The first values choose ``k`` so that they fill at most
    half the bins; a value outside the window either re-centres the window or, if the data no longer
    fit, doubles ``w`` by merging bin pairs ``(2i, 2i+1)`` — an exact operation, so the final counts
    are exactly those a histogram with the final ``w`` would have seen (no refinement error). The
    estimate of quantile ``q`` is taken inside the bin that holds order statistic
    ``x_(floor(r))``, ``r = q * (n - 1)`` (numpy's convention), interpolated by rank and clipped to
    the exact running min/max. Error bound (tested against numpy on the same data)::

        |estimate - np.quantile(x, q, method="lower")| <= w

    and hence ``|estimate - np.quantile(x, q)| <= w + (x_(ceil r) - x_(floor r))``. ``w`` is at most
    ``4 * (max - min) / num_bins`` of that dim (about 0.1 % of the range for 4096 bins), and is
    stored per dim as ``quantile_error``. Mean/std use Chan's parallel update in float64.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .format import Episode
from .manifest import read_regular_text

log = logging.getLogger(__name__)

NORM_STATS_FILE = "norm_stats.json"
DEFAULT_NUM_BINS = 4096
DEFAULT_MIN_RANGE = 1e-4
DEFAULT_MIN_STD = 1e-5
STAT_KEYS = ("mean", "std", "q01", "q99")
# Finest bin allowed relative to a dim's magnitude: keeps |x| / w < 2**41, far inside int64.
_MAG_BITS = 40


class StreamingHistogram:
    """Per-dim histograms with power-of-two aligned bins (see the module docstring)."""

    def __init__(self, num_dims: int, num_bins: int = DEFAULT_NUM_BINS):
        if num_bins < 16 or num_bins % 2:
            raise ValueError(f"num_bins={num_bins} must be an even number >= 16")
        self.num_dims, self.num_bins = num_dims, num_bins
        self.exponent = np.zeros(num_dims, np.int64)  # w = 2**exponent
        self.offset = np.zeros(num_dims, np.int64)  # absolute index of counts[:, 0]
        self.counts = np.zeros((num_dims, num_bins), np.int64)
        self.count = np.zeros(num_dims, np.int64)
        self.min = np.full(num_dims, np.inf)
        self.max = np.full(num_dims, -np.inf)

    def bin_width(self) -> np.ndarray:
        return np.ldexp(1.0, self.exponent)

    def add(self, values: np.ndarray, dims: np.ndarray | None = None) -> None:
        """Add rows ``values`` [N, D]; only the dims where ``dims`` [D] is True."""
        values = np.asarray(values, np.float64)
        active = np.ones(self.num_dims, bool) if dims is None else np.asarray(dims, bool)
        if values.shape[0] == 0 or not active.any():
            return
        for d in np.flatnonzero(active):
            self._fit_window(d, float(values[:, d].min()), float(values[:, d].max()))
        cols = np.flatnonzero(active)
        sub = values[:, cols]
        index = np.floor(sub / self.bin_width()[cols]).astype(np.int64) - self.offset[cols]
        flat = (index + np.arange(len(cols)) * self.num_bins).ravel()
        self.counts[cols] += np.bincount(flat, minlength=len(cols) * self.num_bins).reshape(
            len(cols), self.num_bins)
        self.count[cols] += values.shape[0]
        self.min[cols] = np.minimum(self.min[cols], sub.min(0))
        self.max[cols] = np.maximum(self.max[cols], sub.max(0))

    def _fit_window(self, d: int, lo: float, hi: float) -> None:
        """Make dim d's window cover [lo, hi] (and everything seen so far)."""
        lo_all, hi_all = min(lo, self.min[d]), max(hi, self.max[d])
        magnitude = max(abs(lo_all), abs(hi_all), 2.0 ** -60)
        k_mag = math.floor(math.log2(magnitude)) - _MAG_BITS
        if self.count[d] == 0:
            span = hi - lo
            k_span = math.ceil(math.log2(span / (self.num_bins // 2))) if span > 0 else k_mag
            self.exponent[d] = max(k_span, k_mag)
            w = 2.0 ** self.exponent[d]
            first, last = math.floor(lo / w), math.floor(hi / w)
            self.offset[d] = first - (self.num_bins - (last - first + 1)) // 2
            return
        while True:  # each pass either fits, re-centres, or doubles w (exact merge)
            w = 2.0 ** self.exponent[d]
            first, last = math.floor(lo_all / w), math.floor(hi_all / w)
            if first >= self.offset[d] and last < self.offset[d] + self.num_bins:
                return
            if last - first + 1 <= self.num_bins and self.exponent[d] >= k_mag:
                new_offset = first - (self.num_bins - (last - first + 1)) // 2
                shifted = np.zeros(self.num_bins, np.int64)
                nz = np.flatnonzero(self.counts[d])
                shifted[nz + self.offset[d] - new_offset] = self.counts[d, nz]
                self.counts[d], self.offset[d] = shifted, new_offset
                return
            self._double(d)

    def _double(self, d: int) -> None:
        absolute = np.arange(self.num_bins, dtype=np.int64) + self.offset[d]
        new_offset = self.offset[d] // 2
        merged = np.bincount(absolute // 2 - new_offset, weights=self.counts[d], minlength=self.num_bins)
        self.counts[d] = merged[: self.num_bins].astype(np.int64)
        self.offset[d], self.exponent[d] = new_offset, self.exponent[d] + 1

    def quantile(self, q: float) -> np.ndarray:
        """Estimate per dim (NaN for a dim without data); error bound in the module docstring."""
        out = np.full(self.num_dims, np.nan)
        w = self.bin_width()
        for d in np.flatnonzero(self.count > 0):
            n = int(self.count[d])
            rank = q * (n - 1)
            target = math.floor(rank)
            cum = np.cumsum(self.counts[d])
            b = int(np.searchsorted(cum, target, side="right"))  # first bin with cum > target
            before = int(cum[b - 1]) if b > 0 else 0
            frac = min(max((rank - before + 0.5) / int(self.counts[d, b]), 0.0), 1.0)
            value = (self.offset[d] + b + frac) * w[d]
            out[d] = min(max(value, self.min[d]), self.max[d])
        return out


class RunningMoments:
    """Per-dim mean / variance with Chan's parallel update (float64, per-dim counts)."""

    def __init__(self, num_dims: int):
        self.count = np.zeros(num_dims, np.int64)
        self.mean = np.zeros(num_dims)
        self.m2 = np.zeros(num_dims)

    def add(self, values: np.ndarray, dims: np.ndarray | None = None) -> None:
        values = np.asarray(values, np.float64)
        n_b = values.shape[0]
        if n_b == 0:
            return
        cols = np.arange(values.shape[1]) if dims is None else np.flatnonzero(dims)
        sub = values[:, cols]
        mean_b = sub.mean(0)
        m2_b = ((sub - mean_b) ** 2).sum(0)
        n_a = self.count[cols]
        total = n_a + n_b
        delta = mean_b - self.mean[cols]
        self.mean[cols] += delta * n_b / total
        self.m2[cols] += m2_b + delta ** 2 * n_a * n_b / total
        self.count[cols] = total

    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / np.maximum(self.count, 1))


class _FieldStats:
    """Moments + histogram of one field (state or actions) of one embodiment."""

    def __init__(self, num_dims: int, num_bins: int):
        self.moments = RunningMoments(num_dims)
        self.hist = StreamingHistogram(num_dims, num_bins)

    def add(self, values: np.ndarray, dims: np.ndarray | None = None) -> None:
        self.moments.add(values, dims)
        self.hist.add(values, dims)

    def finalize(self, embodiment: str, field: str, min_range: float, min_std: float) -> dict[str, Any]:
        count = self.moments.count
        mean, std = self.moments.mean.copy(), self.moments.std()
        q01, q99 = self.hist.quantile(0.01), self.hist.quantile(0.99)
        empty = count == 0
        if empty.any():
            log.info("norm stats %s %s: dims %s have no supervised valid values; identity "
                     "placeholder (mean 0, std 1, q01 -1, q99 1)", embodiment, field,
                     np.flatnonzero(empty).tolist())
            mean[empty], std[empty], q01[empty], q99[empty] = 0.0, 1.0, -1.0, 1.0
        for d in np.flatnonzero(~empty & (q99 - q01 < min_range)):
            mid = 0.5 * (q01[d] + q99[d])
            log.warning("norm stats %s %s dim %d: degenerate quantile range q01=%.6g q99=%.6g; "
                        "widened to min_range=%g around %.6g", embodiment, field, d, q01[d], q99[d],
                        min_range, mid)
            q01[d], q99[d] = mid - 0.5 * min_range, mid + 0.5 * min_range
        for d in np.flatnonzero(~empty & (std < min_std)):
            log.warning("norm stats %s %s dim %d: degenerate std %.3g raised to min_std=%g",
                        embodiment, field, d, std[d], min_std)
            std[d] = min_std
        return {"mean": mean.tolist(), "std": std.tolist(), "q01": q01.tolist(), "q99": q99.tolist(),
                "count": count.tolist(), "quantile_error": np.where(empty, 0.0, self.hist.bin_width()).tolist()}


class NormStatsAccumulator:
    """Feed episodes one at a time (``add``), get the ``norm_stats.json`` mapping (``finalize``)."""

    def __init__(self, num_bins: int = DEFAULT_NUM_BINS, min_range: float = DEFAULT_MIN_RANGE,
                 min_std: float = DEFAULT_MIN_STD):
        self.num_bins, self.min_range, self.min_std = num_bins, min_range, min_std
        self._fields: dict[str, dict[str, _FieldStats]] = {}
        self._steps: dict[str, int] = {}
        self._episodes: dict[str, int] = {}

    def add(self, ep: Episode) -> None:
        emb = ep.embodiment
        state_dim, action_dim = ep.state.shape[1], ep.actions.shape[1]
        if emb not in self._fields:
            self._fields[emb] = {"state": _FieldStats(state_dim, self.num_bins),
                                 "actions": _FieldStats(action_dim, self.num_bins)}
            self._steps[emb] = self._episodes[emb] = 0
        fields = self._fields[emb]
        for name, dim in (("state", state_dim), ("actions", action_dim)):
            expected = fields[name].moments.count.shape[0]
            if dim != expected:
                raise ValueError(f"{ep.key}.{name}.npy: {dim} dims, but earlier {emb} episodes have "
                                 f"{expected}; one embodiment needs one {name} layout per shard set")
        valid = ep.step_valid
        fields["state"].add(ep.state[valid])
        fields["actions"].add(ep.actions[valid], ep.action_mask)
        self._steps[emb] += int(valid.sum())
        self._episodes[emb] += 1

    def finalize(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for emb in sorted(self._fields):
            entry: dict[str, Any] = {name: f.finalize(emb, name, self.min_range, self.min_std)
                                     for name, f in self._fields[emb].items()}
            if self._steps[emb] == 0:
                log.warning("norm stats %s: no valid steps in %d episodes", emb, self._episodes[emb])
            entry["num_steps"] = self._steps[emb]
            entry["num_episodes"] = self._episodes[emb]
            out[emb] = entry
        return out


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """JSON written atomically (megavla.fileio: the project's one atomic writer)."""
    from megavla.fileio import atomic_write_json
    atomic_write_json(path, obj)


class NormStatsError(ValueError):
    """norm_stats.json is missing, unreadable or unusable; the message names the file, field and fix."""


def check_norm_stats(stats: Any, where: str) -> None:
    """What the reader needs of every entry: ``state`` and ``actions`` with equal-length, non-empty,
    finite ``mean/std/q01/q99``, ``std >= 0`` and ``q01 <= q99``. A NaN here would put NaN in every
    batch; an inverted range would flip the sign of a dim."""
    fix = "recompute with `megavla data stats DIR --write`"
    if not isinstance(stats, dict) or not stats:
        raise NormStatsError(f"{where}: expected a non-empty object {{embodiment: stats}}; {fix}")
    for emb, entry in stats.items():
        for kind in ("state", "actions"):
            fields = entry.get(kind) if isinstance(entry, dict) else None
            if not isinstance(fields, dict):
                raise NormStatsError(f"{where}: embodiment {emb!r} lacks {kind!r} stats; {fix}")
            try:
                arrays = {k: np.asarray(fields.get(k, []), np.float64) for k in STAT_KEYS}
            except (TypeError, ValueError) as e:
                raise NormStatsError(f"{where}: {emb}.{kind} holds non-numbers ({e}); {fix}") from None
            for key, values in arrays.items():
                bad = np.flatnonzero(~np.isfinite(values.ravel()))
                if bad.size:
                    raise NormStatsError(f"{where}: {emb}.{kind}.{key} is not finite in dims "
                                         f"{bad.tolist()} ({values.ravel()[bad[0]]}); {fix}")
            lengths = {k: a.size if a.ndim == 1 else -1 for k, a in arrays.items()}
            if len(set(lengths.values())) != 1 or min(lengths.values()) <= 0:
                raise NormStatsError(f"{where}: {emb}.{kind} fields must be equal-length, non-empty "
                                     f"lists; got lengths {lengths}; {fix}")
            negative = np.flatnonzero(arrays["std"] < 0)
            if negative.size:
                raise NormStatsError(f"{where}: {emb}.{kind}.std is negative in dims {negative.tolist()}; {fix}")
            inverted = np.flatnonzero(arrays["q01"] > arrays["q99"])
            if inverted.size:
                d = int(inverted[0])
                raise NormStatsError(f"{where}: {emb}.{kind}: q01 > q99 in dims {inverted.tolist()} (dim {d}: "
                                     f"q01={arrays['q01'][d]:.6g} q99={arrays['q99'][d]:.6g}); {fix}")


def norm_affine(fields: dict[str, Any], mode: str, floor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(center, scale, width) in float32/float64 with ``normalized = (x - center) / scale``: the one
    definition of the reader's normalization (megavla.data.normalize.Normalizer uses it too).
    quantile: center = (q01 + q99) / 2, scale = max(q99 - q01, floor) / 2, width = q99 - q01;
    zscore: center = mean, scale = max(std, floor), width = std; none: identity, width = inf."""
    if mode == "quantile":
        q01, q99 = np.asarray(fields["q01"], np.float64), np.asarray(fields["q99"], np.float64)
        width = q99 - q01
        center, scale = (q01 + q99) / 2, np.maximum(width, floor) / 2
    elif mode == "zscore":
        width = np.asarray(fields["std"], np.float64)
        center, scale = np.asarray(fields["mean"], np.float64), np.maximum(width, floor)
    elif mode == "none":
        n = len(fields["mean"])
        return np.zeros(n, np.float32), np.ones(n, np.float32), np.full(n, np.inf)
    else:
        raise ValueError(f"normalization mode {mode!r}; choose quantile, zscore or none")
    return center.astype(np.float32), scale.astype(np.float32), width


def load_norm_stats(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a ``norm_stats.json`` (or the one inside a shard set directory); NormStatsError
    names the file and field. A FIFO or directory in its place is refused, never opened blocking."""
    path = Path(path)
    if path.is_dir():
        path = path / NORM_STATS_FILE
    try:
        text = read_regular_text(path)
    except FileNotFoundError:
        raise NormStatsError(f"{path}: no norm stats; the shard writer writes {NORM_STATS_FILE} beside "
                             f"manifest.json (recompute with `megavla data stats {path.parent} --write`)") from None
    except OSError as e:
        raise NormStatsError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        stats = json.loads(text)
    except ValueError as e:
        raise NormStatsError(f"{path}: not valid JSON ({e}); recompute with `megavla data stats "
                             f"{path.parent} --write`") from None
    check_norm_stats(stats, str(path))
    return stats


def compare_norm_stats(old: dict[str, Any], new: dict[str, Any]) -> dict[str, float]:
    """Max abs difference per ``<embodiment>.<field>.<stat>`` (inf where a side lacks it)."""
    diffs: dict[str, float] = {}
    for emb in sorted(set(old) | set(new)):
        for name in ("state", "actions"):
            for key in STAT_KEYS:
                a = np.asarray(old.get(emb, {}).get(name, {}).get(key, []), np.float64)
                b = np.asarray(new.get(emb, {}).get(name, {}).get(key, []), np.float64)
                label = f"{emb}.{name}.{key}"
                diffs[label] = float(np.abs(a - b).max()) if a.shape == b.shape and a.size else math.inf
    return diffs
