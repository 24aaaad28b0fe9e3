"""Report writing: Markdown tables, PNG plots (matplotlib Agg), results.json, copies of the configs."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_rate(block: dict) -> str:
    """'0.40 [0.17, 0.69] (4/10)' from a closed_loop summary block."""
    lo, hi = block["ci95"]
    return f"{block['success_rate']:.2f} [{lo:.2f}, {hi:.2f}] ({block['successes']}/{block['episodes']})"


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_diff(test: dict) -> str:
    """'+0.25 [-0.02, 0.49]' from a stats.compare_proportions dict."""
    lo, hi = test["ci95"]
    return f"{test['difference']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def fmt_p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.3g}" if p >= 1e-4 else "<1e-4"


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given): one family per experiment."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def paired_test(first: dict, second: dict) -> dict | None:
    """McNemar exact test when both closed-loop results ran the same start states (else None)."""
    from .stats import mcnemar_exact
    a, b = first.get("episodes_detail"), second.get("episodes_detail")
    key = lambda e: (e["scene"], e["task"], e["seed"], e.get("run_seed", 0))  # noqa: E731  (run_seed: pooled seeds)
    if not a or not b or sorted(map(key, a)) != sorted(map(key, b)):
        return None
    sa, sb = sorted(a, key=key), sorted(b, key=key)
    return mcnemar_exact([e["success"] for e in sa], [e["success"] for e in sb])


def transfer_gap_rows(levels: dict[float, dict[str, dict]], threshold: float = 0.6) -> list[dict]:
    """{level: {"robot": eval, "robot+human": eval, "seen": robot-only eval on seen finetune combos or
    None}} -> one row per level: success delta (co-trained - robot only: positive = human data helped)
    with Newcombe interval and Fisher p, offline error delta (robot only - co-trained: positive = human
    data lowered the error), the blind baselines, and the competence gate (``gate``: pass | fail |
    not evaluated; only ``pass`` levels get a verdict)."""
    from .stats import compare_proportions
    rows = []
    for level in sorted(levels):
        r, rh, seen = levels[level]["robot"], levels[level]["robot+human"], levels[level].get("seen")
        cr, crh = r["closed_loop"], rh["closed_loop"]
        er, erh = r["offline"]["action_mse"], rh["offline"]["action_mse"]
        seen_rate = seen["closed_loop"]["success_rate"] if seen else None
        rows.append({"diversity": level, "robot_success": cr["success_rate"], "robot_human_success": crh["success_rate"],
                     "delta_success": crh["success_rate"] - cr["success_rate"],
                     "comparison": compare_proportions(crh["successes"], crh["episodes"], cr["successes"], cr["episodes"]),
                     "paired": paired_test(crh, cr),
                     "robot_mse": er, "robot_human_mse": erh, "delta_mse": er - erh,
                     "baselines": r["offline"].get("baselines", {}),
                     "baselines_robot_human": rh["offline"].get("baselines", {}),
                     "seen_success": seen_rate, "competence_threshold": threshold,
                     "gate": "not evaluated" if seen is None else "pass" if seen_rate >= threshold else "fail",
                     "robot_cl": cr, "robot_human_cl": crh, "seen_cl": seen["closed_loop"] if seen else None})
    gated = [row for row in rows if row["gate"] == "pass"]
    for row, p in zip(gated, holm([row["comparison"]["p_value"] for row in gated])):
        row["p_holm"] = p
    return rows


def transfer_verdict(rows: list[dict], alpha: float = 0.05) -> dict:
    """Plain-words verdict over the levels that passed the competence gate; refuses when none did."""
    refused = [row for row in rows if row["gate"] != "pass"]
    gated = [row for row in rows if row["gate"] == "pass"]
    lines = []
    for row in refused:
        why = ("its robot-only policy was not evaluated on seen combos" if row["gate"] == "not evaluated" else
               f"robot-only success on its seen finetune combos is {row['seen_success']:.2f} < the competence "
               f"threshold {row['competence_threshold']:.2f}")
        lines.append(f"- {row['diversity']:.0%} diversity: **no transfer verdict**: {why}; a policy that cannot "
                     "do the tasks it was finetuned on fails the targets whether or not human data helps.")
    for row in gated:
        c, p = row["comparison"], row["p_holm"]
        if p < alpha:
            word = "human data **raised**" if c["difference"] > 0 else "human data **lowered**"
            claim = f"{word} target success (significant at α={alpha:g}, Holm-corrected)"
        else:
            claim = f"no significant difference at α={alpha:g} (Holm-corrected)"
        paired = row.get("paired")
        extra = (f" (paired McNemar on the same start states: {paired['only_first']} won only with human data, "
                 f"{paired['only_second']} only without, p = {fmt_p(paired['p_value'])})" if paired else "")
        lines.append(f"- {row['diversity']:.0%} diversity: Δ success {fmt_diff(c)}, Fisher p = {fmt_p(c['p_value'])}, "
                     f"Holm p = {fmt_p(p)}: {claim}.{extra}")
    if not gated:
        summary = ("**No transfer verdict**: the competence gate failed at every level (robot-only success on seen "
                   "finetune combos below the threshold), so target-combo failures cannot be attributed to a lack "
                   "of transfer. Fix competence first (more steps / data, a readable state), then rerun.")
        significant = []
    else:
        significant = [row for row in gated if row["p_holm"] < alpha and row["comparison"]["difference"] > 0]
        best = max(gated, key=lambda row: row["comparison"]["difference"])
        emerged = ", ".join(f"{r['diversity']:.0%}" for r in significant)
        summary = (f"Transfer **emerges** at {emerged} diversity."
                   if significant else "Transfer is **not shown**: no gated level has a significant positive gap.")
        summary += (f" Largest gap: {fmt_diff(best['comparison'])} at {best['diversity']:.0%} diversity "
                    f"(n = {best['robot_human_cl']['episodes']} vs {best['robot_cl']['episodes']} episodes).")
    return {"summary": summary, "lines": lines, "gated_levels": [row["diversity"] for row in gated],
            "refused_levels": [row["diversity"] for row in refused],
            "transfer_levels": [row["diversity"] for row in significant], "alpha": alpha}


def transfer_gap_markdown(rows: list[dict]) -> str:
    """Two tables: closed-loop success with the gate and the test; offline error with the baselines."""
    success = markdown_table(
        ["pretrain diversity", "seen combos, robot only [95% CI]", "gate", "robot only: success [95% CI]",
         "robot+human: success [95% CI]", "Δ success [95% CI]", "p (Fisher)", "p (Holm)"],
        [[f"{row['diversity']:.0%}", fmt_rate(row["seen_cl"]) if row["seen_cl"] else "n/a", row["gate"],
          fmt_rate(row["robot_cl"]), fmt_rate(row["robot_human_cl"]), fmt_diff(row["comparison"]),
          fmt_p(row["comparison"]["p_value"]), fmt_p(row.get("p_holm"))] for row in rows])
    offline = markdown_table(
        ["pretrain diversity", "robot only: action MSE", "robot+human: action MSE", "Δ MSE (robot − r+h)",
         "baseline: zero", "baseline: repeat previous", "baseline: mean action (targets)",
         "baseline: mean action (train)"],
        [[f"{row['diversity']:.0%}", row["robot_mse"], row["robot_human_mse"], f"{row['delta_mse']:+.4f}",
          *(row["baselines"].get(k) for k in ("zero", "repeat_previous", "mean_action", "mean_action_train"))]
         for row in rows])
    return success + "\n\n" + offline


def plot_transfer_gap(rows: list[dict], path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [100 * row["diversity"] for row in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    delta = [row["delta_success"] for row in rows]
    lo = [d - row["comparison"]["ci95"][0] for d, row in zip(delta, rows)]
    hi = [row["comparison"]["ci95"][1] - d for d, row in zip(delta, rows)]
    axes[0].errorbar(x, delta, yerr=[lo, hi], fmt="o-", color="tab:green", capsize=3)
    for xi, row in zip(x, rows):  # levels without a verdict (competence gate) are marked, not hidden
        if row["gate"] != "pass":
            axes[0].annotate("no verdict", (xi, row["delta_success"]), fontsize=7, color="tab:red",
                             xytext=(3, 3), textcoords="offset points")
    axes[0].set_ylabel("Δ success, Newcombe 95% CI")
    axes[1].plot(x, [row["delta_mse"] for row in rows], "o-", color="tab:purple")
    axes[1].set_ylabel("Δ action MSE (robot − r+h)")
    for ax in axes:
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel("pretraining diversity (% of robot combos)")
    fig.suptitle("human→robot transfer on the target combos", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def copy_configs(run_dirs: dict[str, Path], dest: Path) -> None:
    """config.yaml (+ init_from.json) of every run, flat under ``dest``, named after the run."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, run_dir in run_dirs.items():
        shutil.copyfile(Path(run_dir) / "config.yaml", dest / f"{name}.yaml")
        init = Path(run_dir) / "init_from.json"
        if init.is_file():
            shutil.copyfile(init, dest / f"{name}.init_from.json")


def write_json(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(obj, indent=1, default=str))
    return path
