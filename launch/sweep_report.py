"""`megavla sweep report DIR [--sweep SWEEP.yaml]`: one Markdown table and one PNG per swept axis.

Reads what every run directory of a sweep already holds (written by the trainer and the evaluator):

* ``config.yaml``: the run's resolved config. The swept axes are the keys whose values differ
  between runs (``train.run_dir`` and ``launch.*`` excluded); keys named ``seed`` are replicates:
  they are averaged over and become error bars (mean +- sample std across seeds, n shown).
* ``metrics.jsonl``: final losses = the mean of the last ``--last-k`` logged values of ``loss/total``
  and ``loss/flow`` (one logged step of a small batch is noisy), best validation loss.
* ``eval_<tag>.json`` (megavla.eval.experiments.evaluate_run): closed-loop success with its Wilson
  interval and offline action MSE with the best observation-blind baseline, per tag.

When a ``model.*`` key is swept, the parameter count of each run's model (built on the meta device:
no memory, no weights) is a column and the x axis of the model plots, so a model-size sweep ends in a
scaling plot. Runs that are missing (in ``--sweep`` but without a directory), unfinished or
unreadable are listed in the table with their state and named and counted in the report; plots use
finished runs only and say how many were left out.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megavla.config import Config, ConfigError, build, load_config, to_dict
from megavla.config.core import apply_overrides

from . import rundir
from .sweep_spec import expand, read_sweep

log = logging.getLogger(__name__)

IGNORED_PREFIXES = ("launch.", "train.run_dir", "train.progress", "train.tensorboard")
LOSS_KEYS = {"final_loss": "loss/total", "final_flow_loss": "loss/flow"}


@dataclass
class RunEntry:
    name: str
    path: Path
    state: str
    config: dict = field(default_factory=dict)  # flattened dotted keys
    step: int | None = None
    total_steps: int | None = None
    metrics: dict = field(default_factory=dict)  # final_loss, final_flow_loss, best_val
    evals: dict = field(default_factory=dict)  # tag -> summary
    parameters: int | None = None
    error: str | None = None  # a failed run's one-line error (launch.json)
    tree: dict = field(default_factory=dict)  # the config as saved (not flattened)


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def tail_losses(run_dir: Path, last_k: int) -> dict:
    """Mean of the last ``last_k`` logged values of each loss key (unreadable lines counted)."""
    values: dict[str, list[float]] = {name: [] for name in LOSS_KEYS}
    path = run_dir / rundir.METRICS_FILE
    if not path.is_file():
        return {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # rundir.read_metrics counts and logs these
        for name, key in LOSS_KEYS.items():
            v = record.get(key) if isinstance(record, dict) else None
            if isinstance(v, (int, float)) and math.isfinite(v):
                values[name].append(float(v))
    return {name: float(np.mean(v[-last_k:])) for name, v in values.items() if v}


def read_evals(run_dir: Path) -> dict:
    out = {}
    for path in sorted(run_dir.glob("eval_*.json")):
        tag = path.stem.removeprefix("eval_")
        try:
            saved = json.loads(path.read_text())
            cl, off = saved.get("closed_loop") or {}, saved.get("offline") or {}
            out[tag] = {"success_rate": cl.get("success_rate"), "successes": cl.get("successes"),
                        "episodes": cl.get("episodes"), "ci95": cl.get("ci95"),
                        "action_mse": off.get("action_mse"),
                        "best_baseline": min(off["baselines"].values()) if off.get("baselines") else None}
        except (ValueError, AttributeError, TypeError) as e:
            log.warning("%s: unreadable evaluation (%s); left out of the report", path, e)
    return out


_PARAM_CACHE: dict[str, int | None] = {}


def parameter_count(model_cfg: dict) -> int | None:
    """Parameters of the model a config builds, on the meta device (no memory, no weights)."""
    key = json.dumps(model_cfg, sort_keys=True, default=str)
    if key not in _PARAM_CACHE:
        import torch
        from megavla.config import Config, build
        from megavla.model.vla import VLA
        try:
            cfg = build(Config, {"model": model_cfg})
            with torch.device("meta"):
                model = VLA(cfg.model)
            _PARAM_CACHE[key] = int(sum(p.numel() for p in model.parameters()))
        except Exception as e:  # a model that cannot be built is reported, not fatal
            log.warning("parameter count of model %s failed: %s", model_cfg.get("preset"), e)
            _PARAM_CACHE[key] = None
    return _PARAM_CACHE[key]


def read_run(run_dir: Path, last_k: int) -> RunEntry:
    if not (run_dir / rundir.CONFIG_FILE).is_file():
        return RunEntry(run_dir.name, run_dir, "no config.yaml")
    try:
        cfg = load_config(run_dir / rundir.CONFIG_FILE)
    except ConfigError as e:
        log.warning("%s: unreadable config (%s)", run_dir, e)
        return RunEntry(run_dir.name, run_dir, "bad config")
    state, error = rundir.run_outcome(run_dir, cfg.train.steps)
    tree = to_dict(cfg)
    entry = RunEntry(run_dir.name, run_dir, state, config=flatten(tree), total_steps=cfg.train.steps,
                     error=error, tree=tree)
    summary = rundir.read_metrics(run_dir)
    entry.step = summary.step
    entry.metrics = {**tail_losses(run_dir, last_k), "best_val": summary.best_val}
    entry.evals = read_evals(run_dir)
    return entry


def collect(directory: str | Path, sweep_file: str | Path | None = None, last_k: int = 5) -> list[RunEntry]:
    """Every run of the sweep: run dirs found in ``directory`` plus, with ``sweep_file``, the runs it
    defines that have no directory yet (state ``missing``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{directory}: not a directory; give a sweep's out_dir")
    skip = {rundir.SUBMITIT_DIR}
    dirs = sorted(p for p in directory.iterdir() if p.is_dir() and p.name not in skip and not p.name.startswith("."))
    entries = [read_run(d, last_k) for d in dirs]
    if sweep_file is not None:
        entries += missing_runs(sweep_file, directory, entries)
    if not entries:
        raise ConfigError(f"{directory}: no run directories in it (a run dir holds config.yaml)")
    return sorted(entries, key=lambda e: e.name)


def missing_runs(sweep_file: str | Path, directory: Path, entries: list[RunEntry]) -> list[RunEntry]:
    """The sweep's runs without a directory, state ``missing``. Their configs come from a run that has
    one (its saved config.yaml holds what the sweep command line gave: data.sources, tokenizer dir,
    ...) with the missing run's grid values put in; the sweep file alone lacks those overrides."""
    _, _, _, points = read_sweep(sweep_file, out_dir=directory)
    have = {e.name for e in entries}
    todo = [(name, overrides) for name, overrides in points if name not in have]
    reference = next((e.tree for e in entries if e.tree), None)
    if not todo:
        return []
    if reference is None:  # no run has started: the sweep file must build on its own
        try:
            _, runs = expand(sweep_file, out_dir=directory)
        except ConfigError as e:
            raise ConfigError(f"{e} (no run in {directory} has a config.yaml to take the command-line "
                              "overrides from; run the sweep first)") from None
        configs = {r.name: r.cfg for r in runs}
    else:
        configs = {}
        for name, overrides in todo:
            tree = apply_overrides(reference, [*overrides, f"train.run_dir={(directory / name).resolve()}"])
            try:
                configs[name] = build(Config, tree)
            except ConfigError as e:
                raise ConfigError(f"{sweep_file}: run {name}: {e}") from None
    return [RunEntry(name, directory / name, "missing", config=flatten(to_dict(configs[name])),
                     total_steps=configs[name].train.steps) for name, _ in todo]


def swept_axes(entries: list[RunEntry]) -> list[str]:
    """Config keys whose values differ between the runs that have a config, in config order."""
    configs = [e.config for e in entries if e.config]
    keys = list(dict.fromkeys(k for c in configs for k in c))
    axes = []
    for key in keys:
        if key.startswith(IGNORED_PREFIXES):
            continue
        values = {json.dumps(c.get(key), sort_keys=True, default=str) for c in configs}
        if len(values) > 1:
            axes.append(key)
    return axes


def is_seed(axis: str) -> bool:
    return axis.split(".")[-1] == "seed"


def add_parameter_counts(entries: list[RunEntry], axes: list[str]) -> bool:
    if not any(a.startswith("model.") for a in axes):
        return False
    for e in entries:
        if e.config:
            model = {k.removeprefix("model."): v for k, v in e.config.items() if k.startswith("model.")}
            e.parameters = parameter_count(_unflatten(model))
    return True


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


# --------------------------------------------------------------------------- tables + plots ----
def metric_names(entries: list[RunEntry]) -> list[tuple[str, str]]:
    """(key, label) of every metric some run has: losses, then per eval tag success and MSE."""
    names = [(k, label) for k, label in (("final_loss", "final loss"), ("final_flow_loss", "final flow loss"),
                                         ("best_val", "best val loss"))
             if any(e.metrics.get(k) is not None for e in entries)]
    for tag in sorted({t for e in entries for t in e.evals}):
        names += [(f"{tag}:success_rate", f"{tag}: success"), (f"{tag}:action_mse", f"{tag}: action MSE")]
    return names


def metric(e: RunEntry, key: str) -> float | None:
    if ":" in key:
        tag, field_ = key.split(":", 1)
        value = e.evals.get(tag, {}).get(field_)
    else:
        value = e.metrics.get(key)
    return None if value is None else float(value)


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    if isinstance(v, list):
        return "[" + ", ".join(map(str, v)) + "]"
    return str(v)


def _params(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M"


def run_table(entries: list[RunEntry], axes: list[str], with_params: bool) -> str:
    tags = sorted({t for e in entries for t in e.evals})
    cols = ["run", "state", "step", *axes, *(["parameters"] if with_params else []),
            "final loss", "final flow loss", "best val loss"]
    for tag in tags:
        cols += [f"{tag}: success [95% CI] (k/n)", f"{tag}: action MSE", f"{tag}: best blind baseline"]
    with_errors = any(e.error for e in entries)
    cols += ["error"] if with_errors else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for e in entries:
        step = "-" if e.step is None else f"{e.step}/{e.total_steps}"
        row = [e.name, e.state, step, *(_fmt(e.config.get(a)) if e.config else "-" for a in axes)]
        row += [_params(e.parameters)] if with_params else []
        row += [_fmt(e.metrics.get(k)) for k in ("final_loss", "final_flow_loss", "best_val")]
        for tag in tags:
            ev = e.evals.get(tag)
            if ev is None or ev.get("success_rate") is None:
                row += ["-", _fmt(ev.get("action_mse") if ev else None), "-"]
                continue
            lo, hi = ev["ci95"] or (float("nan"), float("nan"))
            row += [f"{ev['success_rate']:.2f} [{lo:.2f}, {hi:.2f}] ({ev['successes']}/{ev['episodes']})",
                    _fmt(ev.get("action_mse")), _fmt(ev.get("best_baseline"))]
        row += [(e.error or "").replace("|", "\\|")] if with_errors else []
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def aggregate(entries: list[RunEntry], axis: str, axes: list[str], key: str) -> dict[str, list[tuple]]:
    """{group label (the other non-seed axes): [(axis value, mean, err_lo, err_hi, n), ...]} over the
    finished runs; error = sample std across seeds (n >= 2), else a lone success rate's Wilson
    interval, else 0."""
    others = [a for a in axes if a != axis and not is_seed(a)]
    cells: dict[str, dict] = {}
    for e in entries:
        value = metric(e, key)
        if e.state != "finished" or value is None:
            continue
        group = ", ".join(f"{a.split('.')[-1]}={_fmt(e.config.get(a))}" for a in others) or "all"
        x = json.dumps(e.config.get(axis), sort_keys=True, default=str)
        cells.setdefault(group, {}).setdefault(x, []).append((value, e))
    out = {}
    for group, by_x in cells.items():
        points = []
        for x, items in by_x.items():
            values = [v for v, _ in items]
            mean = float(np.mean(values))
            if len(values) >= 2:
                lo = hi = float(np.std(values, ddof=1))
            elif key.endswith(":success_rate") and items[0][1].evals[key.split(":")[0]].get("ci95"):
                ci = items[0][1].evals[key.split(":")[0]]["ci95"]
                lo, hi = mean - ci[0], ci[1] - mean
            else:
                lo = hi = 0.0
            points.append((json.loads(x), mean, lo, hi, len(values), items[0][1].parameters))
        out[group] = points
    return out


def _x_positions(points: list[tuple], axis: str, use_params: bool) -> tuple[list[float], list[str] | None]:
    values = [p[0] for p in points]
    if use_params and all(p[5] for p in points):
        return [float(p[5]) for p in points], None
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values], None
    labels = sorted({_fmt(v) for v in values})
    return [float(labels.index(_fmt(v))) for v in values], labels


def plot_axis(entries: list[RunEntry], axis: str, axes: list[str], path: Path, left_out: int) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = metric_names(entries)
    if not names:
        return None
    use_params = axis.startswith("model.") and any(e.parameters for e in entries)
    fig, axs = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    for ax, (key, label) in zip(axs[0], names):
        for group, points in sorted(aggregate(entries, axis, axes, key).items()):
            xs, labels = _x_positions(points, axis, use_params)
            order = np.argsort(xs)
            ax.errorbar([xs[i] for i in order], [points[i][1] for i in order],
                        yerr=[[points[i][2] for i in order], [points[i][3] for i in order]],
                        fmt="o-", capsize=3, label=group)
            if labels:
                ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
        if use_params:
            ax.set_xscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("parameters" if use_params else axis, fontsize=8)
    handles, labels = axs[0][0].get_legend_handles_labels()
    if len(handles) > 1:
        fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(4, len(handles)))
    seeds = [a for a in axes if is_seed(a)]
    note = f"error bars: std over {', '.join(seeds)}" if seeds else "error bars: Wilson 95% (success) / none"
    if left_out:
        note += f"; {left_out} unfinished/missing run(s) not plotted"
    fig.suptitle(f"{axis}  ({note})", fontsize=9)
    fig.tight_layout(rect=(0, 0.08 if len(handles) > 1 else 0, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(directory: str | Path, out: str | Path | None = None, sweep_file: str | Path | None = None,
                 last_k: int = 5) -> tuple[Path, list[Path], list[RunEntry]]:
    """sweep_report.md + sweep_<axis>.png in ``out`` (default: the sweep dir)."""
    directory = Path(directory)
    entries = collect(directory, sweep_file, last_k)  # before mkdir: a mistyped DIR is not created
    out = Path(out) if out else directory
    out.mkdir(parents=True, exist_ok=True)
    axes = swept_axes(entries)
    with_params = add_parameter_counts(entries, axes)
    not_done = [e for e in entries if e.state != "finished"]
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.state] = counts.get(e.state, 0) + 1
    lines = [f"# Sweep report: {directory}", "",
             f"{len(entries)} runs: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) + ".", ""]
    if not_done:
        lines += ["Not finished (listed in the table, left out of the plots): "
                  + ", ".join(f"`{e.name}` ({e.state})" for e in not_done) + ".", ""]
    failed = [e for e in entries if e.error]
    if failed:
        lines += [f"Failed ({len(failed)}), with the error each run recorded:", ""]
        lines += [f"- `{e.name}`: {e.error}" for e in failed] + [""]
    seeds = [a for a in axes if is_seed(a)]
    lines += [f"Swept axes: {', '.join(f'`{a}`' for a in axes) or 'none (all runs share one config)'}"
              + (f"; replicates (error bars): {', '.join(f'`{a}`' for a in seeds)}" if seeds else "") + ".",
              f"Final losses: mean of the last {last_k} logged values. Success: closed-loop, Wilson 95%; "
              "action MSE: offline, normalized units; best blind baseline: the lowest of the zero / "
              "repeat-previous / mean-action predictors on the same targets.", "",
              run_table(entries, axes, with_params), ""]
    plots = []
    for axis in (a for a in axes if not is_seed(a)):
        safe = "".join(c if c.isalnum() or c in ".-_" else "-" for c in axis)
        png = plot_axis(entries, axis, axes, out / f"sweep_{safe}.png", len(not_done))
        if png is not None:
            plots.append(png)
            lines += [f"## {axis}", "", f"![{axis}]({png.name})", ""]
    report = out / "sweep_report.md"
    report.write_text("\n".join(lines))
    return report, plots, entries
