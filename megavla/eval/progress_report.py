"""The diversity report's goal-directed section: rubric progress per arm, seed-aware tests, efficiency.

Per level and arm, from the per-step traces of every target episode of every seed (rubric.py):
mean progress and success with 95% hierarchical-bootstrap intervals, the rate of "did another task"
and of approaching the instructed block first. Tests (stats.compare_means: hierarchical-bootstrap
interval, seed-stratified permutation p), each family Holm-corrected across the levels it covers:
progress and success of robot+human - robot only, and of robot+human+grip - robot only. Transfer
efficiency, (arm - robot only) / (control - robot only), where the positive control ran; when the
control does not beat robot-only (p >= alpha), the report says this scale cannot detect transfer.
"""
from __future__ import annotations

from pathlib import Path

from .report import fmt_p, holm, markdown_table
from .rubric import score_cell
from .stats import bootstrap_mean, compare_means, transfer_efficiency
from .traces import load_traces

TESTED = ("robot+human", "robot+human+grip")  # each against robot only


def score_run_eval(ev: dict, seen_combos: list[str]) -> dict:
    """The rubric cell of one run's target evaluation (from the traces file beside it)."""
    if not ev.get("traces"):
        raise ValueError(f"{ev.get('run_dir')}: its evaluation has no traces; rerun the experiment command "
                         "(evaluations without traces are run again)")
    return score_cell(load_traces(Path(ev["run_dir"]) / ev["traces"]), seen_combos)


def per_seed(cells: list[dict], key: str) -> list[list[float]]:
    return [[float(s[key]) for s in cell["scores"]] for cell in cells]


def progress_rows(arms: dict[float, dict[str, list[dict]]], seen_combos: list[str], alpha: float = 0.05) -> list[dict]:
    """``arms[level][arm]`` = the arm's target evaluations, one per seed -> one row per level."""
    rows = []
    for level in sorted(arms):
        cells = {arm: [score_run_eval(ev, seen_combos) for ev in evs] for arm, evs in arms[level].items() if evs}
        row = {"diversity": level, "arms": {}, "tests": {}, "efficiency": {}}
        for arm, cs in cells.items():
            row["arms"][arm] = {"progress": bootstrap_mean(per_seed(cs, "progress")),
                                "success": bootstrap_mean(per_seed(cs, "done")),
                                "did_another_task": sum(c["rates"]["did_another_task"] for c in cs) / len(cs),
                                "approached": sum(c["rates"]["approached"] for c in cs) / len(cs),
                                "cells": cs}
        for arm in TESTED:
            if arm in cells and "robot" in cells:
                row["tests"][arm] = {m: compare_means(per_seed(cells[arm], k), per_seed(cells["robot"], k))
                                     for m, k in (("progress", "progress"), ("success", "done"))}
                if "control" in cells:
                    row["efficiency"][arm] = {m: transfer_efficiency(per_seed(cells["robot"], k),
                                                                     per_seed(cells[arm], k),
                                                                     per_seed(cells["control"], k), alpha)
                                              for m, k in (("progress", "progress"), ("success", "done"))}
        rows.append(row)
    for arm in TESTED:  # Holm across the levels each comparison covers
        for metric in ("progress", "success"):
            tested = [r for r in rows if arm in r["tests"]]
            for r, p in zip(tested, holm([r["tests"][arm][metric]["p_value"] for r in tested])):
                r["tests"][arm][metric]["p_holm"] = p
    return rows


def fmt_ci(block: dict) -> str:
    lo, hi = block["ci95"]
    return f"{block['mean']:.2f} [{lo:.2f}, {hi:.2f}]"


def _diff(test: dict) -> str:
    lo, hi = test["ci95"]
    return f"{test['difference']:+.2f} [{lo:+.2f}, {hi:+.2f}], p {fmt_p(test['p_value'])} (Holm {fmt_p(test.get('p_holm'))})"


def progress_markdown(rows: list[dict]) -> str:
    arms = [a for a in ("robot", "robot+human", "robot+human+grip", "control") if any(a in r["arms"] for r in rows)]
    per_arm = markdown_table(
        ["pretrain diversity", "arm", "seeds", "episodes", "progress [95% CI]", "success [95% CI]",
         "instructed block approached first", "did another task"],
        [[f"{r['diversity']:.0%}", arm, b["progress"]["seeds"], b["progress"]["episodes"], fmt_ci(b["progress"]),
          fmt_ci(b["success"]), f"{b['approached']:.2f}", f"{b['did_another_task']:.2f}"]
         for r in rows for arm in arms if (b := r["arms"].get(arm))])
    tests = markdown_table(
        ["pretrain diversity", "comparison (minus robot only)", "Δ progress [95% CI], p", "Δ success [95% CI], p"],
        [[f"{r['diversity']:.0%}", arm, _diff(t["progress"]), _diff(t["success"])]
         for r in rows for arm, t in r["tests"].items()])
    return per_arm + "\n\n" + tests


def progress_verdict(rows: list[dict], alpha: float = 0.05) -> list[str]:
    """One line per tested comparison and level: the progress and success gaps, significant or not
    (Holm), and whether the positive control there could have shown transfer at all."""
    lines = []
    for r in rows:
        for arm, t in r["tests"].items():
            words = []
            for metric in ("progress", "success"):
                c = t[metric]
                sig = c["p_holm"] < alpha
                words.append(f"Δ {metric} {c['difference']:+.2f} ({'significant' if sig else 'not significant'}, "
                             f"Holm p {fmt_p(c['p_holm'])})")
            eff = r["efficiency"].get(arm)
            control = ("" if eff is None else "; positive control " + (
                "beats robot-only" if eff["success"]["detectable"] else "does **not** beat robot-only") + " on success")
            lines.append(f"- {r['diversity']:.0%}, {arm} vs robot only: {', '.join(words)}{control}.")
    return lines


def efficiency_lines(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        for arm, eff in r["efficiency"].items():
            for metric, e in eff.items():
                gap = e["control_gap"]
                head = f"- {r['diversity']:.0%}, {arm}, {metric}:"
                if not e["detectable"]:
                    lines.append(f"{head} the positive control does not beat robot-only (Δ {gap['difference']:+.2f}, "
                                 f"p {fmt_p(gap['p_value'])}): **this scale cannot detect transfer** on {metric}.")
                else:
                    lo, hi = e["ci95"]
                    lines.append(f"{head} efficiency {e['efficiency']:.2f} [{lo:.2f}, {hi:.2f}] (control gap "
                                 f"{gap['difference']:+.2f}, p {fmt_p(gap['p_value'])}).")
    return lines


def plot_progress_gap(rows: list[dict], path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, metric in zip(axes, ("progress", "success")):
        for arm, colour in (("robot+human", "tab:green"), ("robot+human+grip", "tab:orange")):
            pts = [(100 * r["diversity"], r["tests"][arm][metric]) for r in rows if arm in r["tests"]]
            if not pts:
                continue
            x, t = zip(*pts)
            d = [s["difference"] for s in t]
            err = [[v - s["ci95"][0] for v, s in zip(d, t)], [s["ci95"][1] - v for v, s in zip(d, t)]]
            ax.errorbar(x, d, yerr=err, fmt="o-", capsize=3, color=colour, label=f"{arm} − robot only")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel("pretraining diversity (% of robot combos)")
        ax.set_ylabel(f"Δ {metric}, 95% hierarchical bootstrap")
    axes[0].legend(fontsize=7)
    fig.suptitle("goal-directed progress and success gaps on the targets", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
