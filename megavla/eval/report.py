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


def transfer_gap_rows(levels: dict[float, dict[str, dict]]) -> list[dict]:
    """{level: {"robot": eval, "robot+human": eval}} -> one row per level with the deltas
    (success delta = co-trained - robot only: positive = human data helped; offline error delta
    = robot only - co-trained: positive = human data lowered the error)."""
    rows = []
    for level in sorted(levels):
        r, rh = levels[level]["robot"], levels[level]["robot+human"]
        sr, srh = r["closed_loop"]["success_rate"], rh["closed_loop"]["success_rate"]
        er, erh = r["offline"]["action_mse"], rh["offline"]["action_mse"]
        rows.append({"diversity": level, "robot_success": sr, "robot_human_success": srh,
                     "delta_success": srh - sr, "robot_mse": er, "robot_human_mse": erh,
                     "delta_mse": er - erh, "robot_cl": r["closed_loop"], "robot_human_cl": rh["closed_loop"]})
    return rows


def transfer_gap_markdown(rows: list[dict]) -> str:
    table = markdown_table(
        ["pretrain diversity", "robot only: success [95% CI]", "robot+human: success [95% CI]", "Δ success",
         "robot only: action MSE", "robot+human: action MSE", "Δ MSE (robot − r+h)"],
        [[f"{row['diversity']:.0%}", fmt_rate(row["robot_cl"]), fmt_rate(row["robot_human_cl"]),
          f"{row['delta_success']:+.2f}", row["robot_mse"], row["robot_human_mse"], f"{row['delta_mse']:+.4f}"]
         for row in rows])
    return table


def plot_transfer_gap(rows: list[dict], path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [100 * row["diversity"] for row in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].plot(x, [row["delta_success"] for row in rows], "o-", color="tab:green")
    axes[0].set_ylabel("Δ success (robot+human − robot)")
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
