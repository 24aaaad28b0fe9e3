"""Per-embodiment normalization of state and actions, and its inverse (for the evaluator).

Stats come from a shard set's ``norm_stats.json``::

    {"<embodiment>": {"state": {"mean", "std", "q01", "q99"}, "actions": {...}, "num_steps": N}}

Modes:

* ``quantile`` (default, as openpi's pi0.5): ``y = 2 (x - mid) / range`` with ``mid = (q01 + q99) / 2``
  and ``range = max(q99 - q01, floor)``, so ``[q01, q99] -> [-1, 1]``. Values outside the quantiles map
  outside ``[-1, 1]`` (no clipping, so ``unnormalize(normalize(x)) == x``). A constant dimension maps to 0.
* ``zscore``: ``y = (x - mean) / max(std, floor)``.
* ``none``: identity.

Degenerate ranges (``q99 - q01`` or ``std`` below ``floor``) use the floor and log one warning per
embodiment and kind, naming the dimensions: never a division blow-up.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

# One definition of the stats checks and the affine map, shared with `megavla data verify`:
# load_norm_stats refuses NaN/inf, inverted (q01 > q99) or negative-std stats naming file and field.
from megavla.data_shards.stats import (NormStatsError, check_norm_stats, load_norm_stats,  # noqa: F401
                                       norm_affine)

log = logging.getLogger(__name__)

KINDS = ("state", "actions")
STAT_FIELDS = ("mean", "std", "q01", "q99")


def merge_norm_stats(stats_list: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine stats of several shard sets. Mean/std merge exactly (pooled by num_steps); q01/q99 of an
    embodiment present in several sets are the step-weighted average of the sets' quantiles (an
    approximation: exact quantiles would need another pass over the data)."""
    grouped: dict[str, list[dict]] = {}
    for stats in stats_list:
        for emb, entry in stats.items():
            grouped.setdefault(emb, []).append(entry)
    merged: dict[str, Any] = {}
    for emb, entries in grouped.items():
        if len(entries) == 1:
            merged[emb] = entries[0]
            continue
        counts = np.array([float(e.get("num_steps", 1)) for e in entries])
        w = counts / counts.sum()
        out: dict[str, Any] = {"num_steps": int(counts.sum())}
        for kind in KINDS:
            dims = {len(e[kind]["mean"]) for e in entries}
            if len(dims) != 1:
                raise NormStatsError(f"embodiment {emb!r}: {kind} dims differ between shard sets ({dims})")
            arr = {f: np.array([e[kind][f] for e in entries], dtype=np.float64) for f in STAT_FIELDS}
            mean = (w[:, None] * arr["mean"]).sum(0)
            var = (w[:, None] * (arr["std"] ** 2 + (arr["mean"] - mean) ** 2)).sum(0)
            out[kind] = {"mean": mean.tolist(), "std": np.sqrt(var).tolist(),
                         "q01": (w[:, None] * arr["q01"]).sum(0).tolist(),
                         "q99": (w[:, None] * arr["q99"]).sum(0).tolist()}
        merged[emb] = out
    return merged


class Normalizer:
    """normalize / unnormalize arrays or tensors ``[..., d]`` of one embodiment and kind.

    Only the first ``d`` (the embodiment's native dim) entries of the last axis are transformed; extra
    (padding) entries pass through unchanged, so padded model outputs can be given as they are.
    """

    def __init__(self, stats: dict[str, Any], mode: str = "quantile", floor: float = 1e-3):
        if mode not in ("quantile", "zscore", "none"):
            raise ValueError(f"normalization mode {mode!r}; choose quantile, zscore or none")
        check_norm_stats(stats, "norm stats")
        self.stats, self.mode, self.floor = stats, mode, float(floor)
        self._affine: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        for emb, entry in stats.items():
            for kind in KINDS:
                self._affine[(emb, kind)] = self._make_affine(emb, kind, entry[kind])

    def _make_affine(self, emb: str, kind: str, s: dict) -> tuple[np.ndarray, np.ndarray]:
        """(center, half_range) with y = (x - center) / half_range (data_shards.stats.norm_affine)."""
        center, scale, width = norm_affine(s, self.mode, self.floor)
        if self.mode == "none":
            return center, scale
        degenerate = np.flatnonzero(width < self.floor)
        if degenerate.size:
            log.warning("norm stats %s.%s: dims %s have a %s below the floor %g; using the floor "
                        "(constant dims normalize to ~0)", emb, kind, degenerate.tolist(),
                        "q99-q01 range" if self.mode == "quantile" else "std", self.floor)
        return center, scale

    @classmethod
    def from_file(cls, path: str | Path, mode: str = "quantile", floor: float = 1e-3) -> "Normalizer":
        """From a norm_stats.json (a shard set's, or the one saved beside a checkpoint)."""
        return cls(load_norm_stats(path), mode, floor)

    @property
    def embodiments(self) -> list[str]:
        return sorted(self.stats)

    def dim(self, embodiment: str, kind: str) -> int:
        return int(self._lookup(embodiment, kind)[0].shape[0])

    def _lookup(self, embodiment: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            return self._affine[(embodiment, kind)]
        except KeyError:
            raise NormStatsError(f"no {kind!r} norm stats for embodiment {embodiment!r}; stats have "
                                 f"{self.embodiments}") from None

    def _apply(self, x, embodiment: str, kind: str, inverse: bool):
        center, scale = self._lookup(embodiment, kind)
        d = center.shape[0]
        if x.shape[-1] < d:
            raise NormStatsError(f"{embodiment}.{kind}: last dim {x.shape[-1]} < stats dim {d}")
        if isinstance(x, torch.Tensor):
            c = torch.as_tensor(center, device=x.device, dtype=x.dtype)
            s = torch.as_tensor(scale, device=x.device, dtype=x.dtype)
            out = x.clone()
        else:
            c, s = center, scale
            out = np.array(x, dtype=np.float32, copy=True)
        head = out[..., :d]
        out[..., :d] = head * s + c if inverse else (head - c) / s
        return out

    def normalize(self, x, embodiment: str, kind: str = "actions"):
        return self._apply(x, embodiment, kind, inverse=False)

    def unnormalize(self, y, embodiment: str, kind: str = "actions"):
        return self._apply(y, embodiment, kind, inverse=True)

    def to_json(self) -> str:
        """The stats this normalizer uses (save beside checkpoints; reload with Normalizer(json.loads))."""
        return json.dumps(self.stats)


# The gripper convention of every embodiment (data_shards/hands.py): absolute, 0 open .. 1 closed.
GRIPPER_RANGE_STATS = {"mean": 0.5, "std": 0.5, "q01": 0.0, "q99": 1.0}


def with_human_gripper_range(stats: dict[str, Any]) -> dict[str, Any]:
    """``data.human_gripper: closure``: a copy of ``stats`` whose human embodiments' gripper action dims
    normalize the convention's [0, 1] to [-1, 1], as a robot gripper that opens and closes does. Those
    dims hold placeholder stats when the data masked them (shard stats leave masked dims out), and the
    closure estimate must land where the robot's closed / open values do for a shared meaning."""
    from megavla.data_shards.hands import GRIPPER_DIMS, HUMAN_ACTION_DIM
    out = json.loads(json.dumps(stats))
    for emb, entry in out.items():
        if not emb.startswith("human/") or len(entry["actions"]["mean"]) != HUMAN_ACTION_DIM:
            continue
        for d in GRIPPER_DIMS:
            for key, value in GRIPPER_RANGE_STATS.items():
                entry["actions"][key][d] = value
        log.info("data.human_gripper=closure: %s gripper action dims %s normalized from the [0, 1] gripper range",
                 emb, list(GRIPPER_DIMS))
    return out
