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

import numpy as np
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


# ------------------------------------------------------------ per-episode scores, seed-aware ----
# A cell of the seeded experiment holds episodes of several training runs (seeds) of one arm. The
# runs differ more than the episodes of one run do, so episodes are not independent draws: the
# interval resamples seeds, then episodes inside each drawn seed (hierarchical bootstrap); the test
# permutes arm labels only between runs of the same seed index (seed-stratified permutation; the
# two arms' runs of one seed share the data order and start states). One seed per arm reduces both
# to the ordinary episode bootstrap and permutation test.
BOOTSTRAP_RESAMPLES = 4000
PERMUTATIONS = 4000


def _groups(values_by_seed, name: str) -> list[np.ndarray]:
    groups = [np.asarray(v, dtype=np.float64).reshape(-1) for v in values_by_seed]
    if not groups or any(g.size == 0 for g in groups):
        raise ValueError(f"{name}: every seed needs at least one episode score (got sizes "
                         f"{[g.size for g in groups]})")
    return groups


def _seed_mean(groups: list[np.ndarray]) -> float:
    return float(np.mean([g.mean() for g in groups]))  # seeds weigh equally


def hierarchical_means(values_by_seed, resamples: int = BOOTSTRAP_RESAMPLES,
                       rng: np.random.Generator | None = None) -> np.ndarray:
    """[resamples] bootstrap means: seeds drawn with replacement, then episodes within each drawn seed."""
    rng = np.random.default_rng(0) if rng is None else rng
    groups = _groups(values_by_seed, "hierarchical_means")
    k = len(groups)
    per_group = [g[rng.integers(0, g.size, (resamples, k, g.size))].mean(-1) for g in groups]  # [B, k] each
    pick = rng.integers(0, k, (resamples, k))
    stacked = np.stack(per_group)  # [k groups, B, k positions]
    return stacked[pick, np.arange(resamples)[:, None], np.arange(k)[None, :]].mean(-1)


def bootstrap_mean(values_by_seed, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """Mean score (seeds weigh equally) with a 95% hierarchical-bootstrap percentile interval."""
    groups = _groups(values_by_seed, "bootstrap_mean")
    means = hierarchical_means(groups, resamples, np.random.default_rng(seed))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": _seed_mean(groups), "ci95": [float(lo), float(hi)], "seeds": len(groups),
            "episodes": int(sum(g.size for g in groups))}


def stratified_permutation_p(a_by_seed, b_by_seed, permutations: int = PERMUTATIONS, seed: int = 0) -> float:
    """Two-sided p of mean(a) - mean(b), permuting labels within each seed index's pooled episodes."""
    a, b = _groups(a_by_seed, "group a"), _groups(b_by_seed, "group b")
    if len(a) != len(b):
        raise ValueError(f"a seed-stratified test pairs runs by seed: {len(a)} seeds vs {len(b)}")
    observed = _seed_mean(a) - _seed_mean(b)
    rng = np.random.default_rng(seed)
    diffs = np.zeros(permutations)
    for ga, gb in zip(a, b):
        pooled = np.concatenate([ga, gb])
        order = rng.permuted(np.tile(pooled, (permutations, 1)), axis=1)
        diffs += order[:, :ga.size].mean(1) - order[:, ga.size:].mean(1)
    diffs /= len(a)
    extreme = np.count_nonzero(np.abs(diffs) >= abs(observed) - 1e-12)
    return float((1 + extreme) / (1 + permutations))


def compare_means(a_by_seed, b_by_seed, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """Arm a (e.g. robot+human) minus arm b (robot only) on per-episode scores: difference, 95%
    hierarchical-bootstrap interval, seed-stratified permutation p. JSON-ready."""
    a, b = _groups(a_by_seed, "group a"), _groups(b_by_seed, "group b")
    rng = np.random.default_rng(seed)
    diff = hierarchical_means(a, resamples, rng) - hierarchical_means(b, resamples, rng)
    lo, hi = np.percentile(diff, [2.5, 97.5])
    return {"difference": _seed_mean(a) - _seed_mean(b), "ci95": [float(lo), float(hi)],
            "p_value": stratified_permutation_p(a, b, seed=seed), "test": "seed_stratified_permutation",
            "interval": "hierarchical_bootstrap", "seeds": [len(a), len(b)]}


def transfer_efficiency(robot, robot_human, control, alpha: float = 0.05,
                        resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """(robot+human - robot) / (control - robot), per-seed per-episode scores of each arm. The positive
    control (robot demonstrations of the targets) shows what this scale can learn about the targets at
    all; when it does not beat robot-only significantly, the ratio is undefined and ``detectable`` is
    False: this scale cannot detect transfer. Interval: hierarchical bootstrap, percentile."""
    r, rh, c = (_groups(x, n) for x, n in ((robot, "robot"), (robot_human, "robot+human"), (control, "control")))
    control_gap = compare_means(c, r, resamples, seed)
    transfer_gap = compare_means(rh, r, resamples, seed)
    out = {"control_gap": control_gap, "transfer_gap": transfer_gap, "efficiency": None, "ci95": None,
           "detectable": control_gap["difference"] > 0 and control_gap["p_value"] < alpha}
    if not out["detectable"]:
        return out
    rng = np.random.default_rng(seed + 1)
    mr, mrh, mc = (hierarchical_means(g, resamples, rng) for g in (r, rh, c))
    denom = mc - mr
    ok = denom > 0
    ratio = (mrh[ok] - mr[ok]) / denom[ok]
    out["efficiency"] = transfer_gap["difference"] / control_gap["difference"]
    out["ci95"] = [float(x) for x in np.percentile(ratio, [2.5, 97.5])]
    out["resamples_with_positive_control_gap"] = float(ok.mean())
    return out
