"""Weighted source mixing and nested scene x task diversity subsets.

Mixing is *smooth weighted round robin* over sources, one decision per accepted episode: every source
gains its weight in credit, the richest source is picked and pays the total. The realized share of
source ``i`` after ``n`` episodes is within ``1/n`` of its weight at every ``n`` (a random draw would
need ~10^4 episodes for 1%), it is deterministic, and its state is a few floats. Randomness in the
order comes from the shuffle window downstream (pipeline.py).

Diversity subsets rank every combo of the universe by a seeded hash and keep the first
``round(fraction * N)``; the ranking does not depend on the fraction, so the 25% set is a prefix of the
50% set (nested), and the same combo is kept or dropped for every source (robot and human alike).
"""
from __future__ import annotations

import hashlib
import re

_KEY_COMBO = re.compile(r"_s(\d+)_t(\d+)_e\d+$")


def combo_of_key(key: str) -> str | None:
    """'robot-arm_s0003_t0001_e000007' -> '3:1' (format.Episode.key); None if the key is foreign."""
    m = _KEY_COMBO.search(key)
    return f"{int(m.group(1))}:{int(m.group(2))}" if m else None


def combo_rank_key(combo: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}|{combo}".encode()).digest()


def select_combos(universe: list[str] | set[str], fraction: float, seed: int = 0,
                  include: list[str] | tuple[str, ...] = (), exclude: list[str] | tuple[str, ...] = ()
                  ) -> set[str]:
    """Kept combos: restrict to ``include`` (if given), drop ``exclude``, then keep the first
    ``round(fraction * N)`` (at least one when fraction > 0) in seeded-hash order."""
    combos = set(universe)
    if include:
        combos &= set(include)
    combos -= set(exclude)
    ranked = sorted(combos, key=lambda c: combo_rank_key(c, seed))
    if fraction <= 0.0:
        return set()
    keep = max(1, round(fraction * len(ranked))) if ranked else 0
    return set(ranked[:keep])


class WeightedRoundRobin:
    """Deterministic weighted interleaving of named sources (see module docstring)."""

    def __init__(self, weights: dict[str, float], credits: dict[str, float] | None = None):
        active = {k: float(v) for k, v in sorted(weights.items()) if v > 0}
        if not active:
            raise ValueError(f"mixture weights {weights} leave no source with a positive weight")
        total = sum(active.values())
        self.weights = {k: v / total for k, v in active.items()}
        self.credits = {k: 0.0 for k in self.weights}
        if credits is not None:
            self.load_state_dict(credits)

    def next(self) -> str:
        for name, w in self.weights.items():
            self.credits[name] += w
        # max() keeps the first (sorted name order) on ties: deterministic.
        pick = max(self.credits, key=lambda n: self.credits[n])
        self.credits[pick] -= 1.0
        return pick

    def state_dict(self) -> dict[str, float]:
        return dict(self.credits)

    def load_state_dict(self, credits: dict[str, float]) -> None:
        if set(credits) != set(self.weights):
            raise ValueError(f"mixture state has sources {sorted(credits)}, loader has {sorted(self.weights)}")
        self.credits = {k: float(credits[k]) for k in self.weights}
