"""Statistics for closed-loop success rates: Wilson intervals and the two-proportion comparison.

Why these and not the textbook normal approximations: cells have tens of episodes and rates at or
near 0 and 1 (a policy that never succeeds on a target is the usual baseline), where the Wald interval
collapses to a point and the pooled z-test's normal approximation is poor (expected counts < 5).

* :func:`wilson_interval`: 95% Wilson score interval of one rate (inside [0, 1], sane at 0/n and n/n).
* :func:`compare_proportions`: "robot+human vs robot" on the same target combos. The p-value is the
  two-sided **Fisher exact test** (exact at any n and at 0/n, no large-sample assumption; conservative,
  so a small p is believable). The difference gets **Newcombe's hybrid score interval** (method 10,
  built from the two Wilson intervals; good coverage at small n, unlike Wald). The pooled two-proportion
  z statistic is reported beside them for readers used to it, with its (approximate) p-value, but the
  verdict uses Fisher's p.

Both conditions of a level are evaluated on the same start states (closed_loop's seeds depend only on
the combo and the episode index), so :func:`mcnemar_exact` (the exact paired test on the discordant
start states) is reported too, as a secondary, more powerful check; the verdict stays with Fisher's
p, fixed before any result was seen, so that picking the smaller p-value is not an option.

Episodes within a cell are not fully independent draws of one Bernoulli (several target combos with
different difficulty are pooled), so these are the usual binomial approximations; per-combo rates are
reported alongside so a reader can see heterogeneity.
"""
from __future__ import annotations

import math

from scipy import stats as sps

Z95 = 1.959964


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (stays inside [0, 1], sane at 0/n and n/n)."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} must be in [0, n={n}]")
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_interval(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """95% interval for p1 - p2 (Newcombe 1998, method 10: hybrid score from two Wilson intervals)."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, z)
    l2, u2 = wilson_interval(k2, n2, z)
    d = p1 - p2
    return (d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
            d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def pooled_z(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """Pooled two-proportion z statistic for p1 - p2 and its two-sided normal p-value.
    Both rates 0 (or both 1) give z = 0, p = 1: no evidence of a difference."""
    pooled = (k1 + k2) / (n1 + n2)
    var = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    if var == 0:
        return 0.0, 1.0
    z = (k1 / n1 - k2 / n2) / math.sqrt(var)
    return z, float(2 * sps.norm.sf(abs(z)))


def fisher_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided Fisher exact p-value of the 2x2 table [[k1, n1-k1], [k2, n2-k2]]."""
    return float(sps.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]], alternative="two-sided")[1])


def compare_proportions(k1: int, n1: int, k2: int, n2: int) -> dict:
    """Group 1 (e.g. robot+human) vs group 2 (robot only): JSON-ready difference, interval and tests."""
    for k, n, name in ((k1, n1, "group 1"), (k2, n2, "group 2")):
        if n <= 0 or not 0 <= k <= n:
            raise ValueError(f"{name}: {k} successes of {n} episodes is not a success count; "
                             "each cell needs at least one episode")
    z, p_z = pooled_z(k1, n1, k2, n2)
    lo, hi = newcombe_interval(k1, n1, k2, n2)
    return {"difference": k1 / n1 - k2 / n2, "ci95": [lo, hi], "p_value": fisher_p(k1, n1, k2, n2),
            "test": "fisher_exact_two_sided", "z": z, "p_value_z": p_z,
            "counts": [[k1, n1], [k2, n2]]}


def mcnemar_exact(first: list[bool], second: list[bool]) -> dict:
    """Exact McNemar test on paired outcomes (same start states): two-sided binomial test of the
    discordant pairs (first succeeded only vs second succeeded only) against 1/2."""
    if len(first) != len(second) or not first:
        raise ValueError(f"paired outcomes need equal, non-zero lengths; got {len(first)} and {len(second)}")
    only_first = sum(a and not b for a, b in zip(first, second))
    only_second = sum(b and not a for a, b in zip(first, second))
    n = only_first + only_second
    p = 1.0 if n == 0 else float(sps.binomtest(only_first, n, 0.5).pvalue)
    return {"only_first": only_first, "only_second": only_second, "p_value": p}
