"""`megavla sweep SWEEP.yaml [--executor slurm ...]`, `megavla sweep status DIR` and
`megavla sweep report DIR` (one Markdown table + a PNG per swept axis: launch/sweep_report.py).

A sweep file names a base config, fixed overrides and a grid of dotted keys -> value lists::

    base: ../demo.yaml                # relative to this file (configs/sweeps/smoke.yaml is one)
    out_dir: runs/sweeps/transfer     # one run directory per grid point inside it
    overrides: [train.steps=2000]
    grid:
      model.preset: [tiny, small]
      data.diversity_fraction: [0.25, 1.0]
      data.mixture.human: [0.0, 1.0]
      train.seed: [0, 1]

Every grid point becomes a run named from its values (``preset-tiny_diversity_fraction-0.25_...``),
so names are predictable and stay put when the grid grows. Every run's config is checked before any
is submitted (:func:`check_runs`: what `megavla train` checks, model vs data sizes included). On SLURM
the runs to submit go out as ONE job array; locally they run one after another. Re-running the same
command skips finished runs and runs still queued or running, and resumes interrupted ones from their
newest checkpoint; failed runs are submitted again.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from megavla.config import ConfigError, load_config, to_dict

from . import rundir
from .cli import add_launch_flags, flag_overrides
from .executor import LaunchError, make_executor, prepare_run, preflight, record_submission
# what a sweep file defines lives in sweep_spec (the report reads it too); re-exported for callers
from .sweep_spec import SweepRun, expand, run_names  # noqa: F401
from .task import TrainTask

log = logging.getLogger(__name__)

def check_runs(sweep_file: str | Path, runs: list[SweepRun]) -> None:
    """Every run's config checked as `megavla train` checks it (paths, shard sets, model vs data vs
    tokenizers: megavla.config.checks) before anything is submitted. One ConfigError that names each
    bad run with its problems (key, values, fix) on one line. Runs of a stand-in trainer
    (launch.entry) have their own rules and are not checked."""
    from megavla.config.checks import config_problems
    from megavla.train.preflight import check_launchable, check_paths, check_trainable
    bad = []
    for run in runs:
        cfg = run.cfg
        if cfg.launch.entry != "megavla.train.entry:run":
            continue
        problems = []
        try:   # what `megavla train` checks before it starts a process
            check_trainable(cfg)
            check_paths(cfg)
            check_launchable(cfg, cfg.launch.nodes * cfg.launch.tasks_per_node_effective)
        except ConfigError as e:
            problems.append(str(e))
        problems += [p.message for p in config_problems(cfg)]
        if problems:
            bad.append(f"  run {run.name}: " + "; ".join(problems))
    if bad:
        raise ConfigError(f"{sweep_file}: {len(bad)} of {len(runs)} run(s) would fail; nothing submitted. "
                          "Fix the sweep file (overrides / grid) or the command-line overrides:\n"
                          + "\n".join(bad))


def _check_same_config(run: SweepRun) -> None:
    """Resuming a run with a changed config would silently mix two experiments."""
    path = Path(run.cfg.train.run_dir) / rundir.CONFIG_FILE
    if not path.is_file():
        return
    old = to_dict(load_config(path))
    new = to_dict(run.cfg)
    old.pop("launch", None), new.pop("launch", None)  # resources may change between attempts
    if old != new:
        diff = [f"{s}.{k}" for s in new for k in new[s] if old.get(s, {}).get(k) != new[s][k]]
        raise ConfigError(f"run {run.name}: its existing {path} differs from the sweep's config in "
                          f"{diff}; use a new out_dir for a changed sweep")


def submit_sweep(sweep_file: str | Path, extra_overrides: list[str] = (), dry_run: bool = False,
                 array_parallelism: int | None = None, out_dir: str | Path | None = None) -> list[str]:
    """Submit the runs that need it; returns their names (empty when everything is done/running)."""
    out_dir, runs = expand(sweep_file, extra_overrides, out_dir)
    check_runs(sweep_file, runs)
    lc = runs[0].cfg.launch
    todo: list[SweepRun] = []
    for run in runs:
        state = rundir.run_state(run.cfg.train.run_dir, run.cfg.train.steps)
        if state in ("finished", "queued", "running"):
            log.info("sweep: skipping %s (%s)", run.name, state)
            continue
        if state == "unresumable":
            log.error("sweep: skipping %s: %s has trained steps but no loadable checkpoint; restore one or "
                      "delete the run dir to start it over", run.name, run.cfg.train.run_dir)
            continue
        _check_same_config(run)
        resumable = state == "interrupted" or (state == "failed" and rundir.latest_checkpoint(run.cfg.train.run_dir))
        log.info("sweep: %s %s (%s)", "resuming" if resumable else "starting", run.name, state)
        todo.append(run)
    log.info("sweep %s: %d run(s), %d to submit, %d skipped", out_dir, len(runs), len(todo),
             len(runs) - len(todo))
    if dry_run or not todo:
        return [r.name for r in todo]
    preflight(lc)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dirs = [prepare_run(r.cfg) for r in todo]
    for d in run_dirs:
        rundir.update_launch_record(d, status="submitting")
    if lc.executor == "slurm":
        # One array: every element shares the resources; logs go to the sweep's submitit/ folder.
        executor = make_executor(lc, out_dir.resolve() / rundir.SUBMITIT_DIR, name=f"sweep-{out_dir.name}",
                                 array_parallelism=array_parallelism)
        with executor.batch():
            jobs = [executor.submit(TrainTask(str(d)), "auto") for d in run_dirs]
        for run, d, job in zip(todo, run_dirs, jobs):
            record_submission(d, run.cfg, job)
        print(f"submitted job array {jobs[0].job_id.split('_')[0]} with {len(jobs)} run(s); "
              f"status: megavla sweep status {out_dir}")
        return [r.name for r in todo]
    # Local: array_parallelism runs at a time (default 1: one after the other).
    width, running = max(1, array_parallelism or 1), []
    for i, (run, d) in enumerate(zip(todo, run_dirs)):
        executor = make_executor(lc, d / rundir.SUBMITIT_DIR, name=run.name)
        job = executor.submit(TrainTask(str(d)), "auto")
        record_submission(d, run.cfg, job)
        log.info("sweep: run %d/%d %s (local job %s)", i + 1, len(todo), run.name, job.job_id)
        running.append((run, job))
        while len(running) >= width or (i == len(todo) - 1 and running):
            _wait_local(*running.pop(0))
    return [r.name for r in todo]


def _wait_local(run: SweepRun, job) -> None:
    try:
        job.results()
    except Exception:  # one failed run should not stop the sweep; status shows it
        _, error = rundir.run_outcome(run.cfg.train.run_dir, run.cfg.train.steps)
        log.error("sweep: run %s failed: %s (logs: %s)", run.name, error or "no error recorded",
                  job.paths.stderr)


def status_rows(directory: str | Path) -> list[dict]:
    """One row per run dir found in ``directory`` (a sweep dir or a single run dir)."""
    directory = Path(directory)
    if (directory / rundir.CONFIG_FILE).is_file():
        run_dirs = [directory]
    else:
        run_dirs = sorted(p.parent for p in directory.glob(f"*/{rundir.CONFIG_FILE}"))
    rows = []
    for d in run_dirs:
        try:
            cfg = load_config(d / rundir.CONFIG_FILE)
        except ConfigError as e:
            log.warning("%s: unreadable config (%s); listed as 'bad-config'", d, e)
            rows.append({"run": d.name, "state": "bad-config"})
            continue
        metrics = rundir.read_metrics(d)
        ckpt = rundir.latest_checkpoint(d)
        record = rundir.read_launch_record(d)
        state, error = rundir.run_outcome(d, cfg.train.steps)
        rows.append({
            "run": d.name, "state": state,
            "step": f"{metrics.step if metrics.step is not None else '-'}/{cfg.train.steps}",
            "flow_loss": _number(metrics.flow_loss), "total_loss": _number(metrics.loss),
            "best_val": _number(metrics.best_val),
            "checkpoint": f"{ckpt[0]}" if ckpt else "-",
            "job": str(record.get("job_id", "-")),
            "requeues": str(record.get("attempt", 0)),
            "error": error or "",
        })
    return rows


def _number(value: float | None) -> str:
    return f"{value:.4g}" if value is not None else "-"


# Loss columns: the last logged value of metrics.jsonl's loss/flow (what `megavla demo` prints) and
# loss/total (flow + FAST + subtask, each times its weight); docs/metrics.md lists every metric name.
STATUS_COLUMNS = ["run", "state", "step", "flow_loss", "total_loss", "best_val", "checkpoint", "job", "requeues"]


def format_table(rows: list[dict]) -> str:
    """The status table; a failed run's one-line error follows the table."""
    if not rows:
        return "no runs found"
    cols = STATUS_COLUMNS
    widths = {c: max(len(c), *(len(str(r.get(c, "-"))) for r in rows)) for c in cols}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip()]
    lines += ["  ".join(str(r.get(c, "-")).ljust(widths[c]) for c in cols).rstrip() for r in rows]
    failed = [r for r in rows if r.get("error")]
    if failed:
        lines += ["", f"{len(failed)} failed:"] + [f"  {r['run']}: {r['error']}" for r in failed]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["status"]:
        parser = argparse.ArgumentParser(prog="megavla sweep status")
        parser.add_argument("dir", help="a sweep's out_dir, or one run directory")
        args = parser.parse_args(argv[1:])
        if not Path(args.dir).is_dir():
            sys.stderr.write(f"megavla sweep status: {args.dir} is not a directory\n")
            return 2
        print(format_table(status_rows(args.dir)))
        return 0
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    parser = argparse.ArgumentParser(prog="megavla sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="sweep YAML (configs/sweeps/...)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    add_launch_flags(parser)
    parser.add_argument("--array-parallelism", type=int, default=None,
                        help="at most this many array elements run at once (slurm)")
    parser.add_argument("--out-dir", default=None, help="where the run directories go (default: the "
                        "sweep file's out_dir, else runs/sweeps/<file name>)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs to submit, submit nothing")
    args = parser.parse_intermixed_args(argv)
    try:
        names = submit_sweep(args.sweep, [*args.overrides, *flag_overrides(args)], dry_run=args.dry_run,
                             array_parallelism=args.array_parallelism, out_dir=args.out_dir)
    except (ConfigError, LaunchError) as e:
        sys.stderr.write(f"megavla sweep: error: {e}\n")
        return 2
    if args.dry_run:
        print("\n".join(names) if names else "nothing to submit")
    return 0


def report_main(argv: list[str]) -> int:
    from .sweep_report import write_report
    parser = argparse.ArgumentParser(prog="megavla sweep report",
                                     description="gather every run of a sweep into sweep_report.md + "
                                     "sweep_<axis>.png (losses, offline and closed-loop metrics)")
    parser.add_argument("dir", help="the sweep's out_dir (one run directory per grid point)")
    parser.add_argument("--sweep", help="the sweep YAML: its runs without a directory are listed as missing")
    parser.add_argument("--out", help="where the report goes (default: DIR)")
    parser.add_argument("--last-k", type=int, default=5, help="final loss = mean of the last K logged values")
    args = parser.parse_args(argv)
    if args.last_k < 1:
        sys.stderr.write(f"megavla sweep report: error: --last-k {args.last_k} must be >= 1\n")
        return 2
    try:
        report, plots, entries = write_report(args.dir, args.out, args.sweep, args.last_k)
    except ConfigError as e:
        sys.stderr.write(f"megavla sweep report: error: {e}\n")
        return 2
    unfinished = [e for e in entries if e.state != "finished"]
    print(f"{len(entries)} runs, {len(entries) - len(unfinished)} finished"
          + (f"; not finished: {', '.join(f'{e.name} ({e.state})' for e in unfinished)}" if unfinished else ""))
    for e in entries:
        if e.error:
            print(f"  {e.name} failed: {e.error}")
    for png in plots:
        print(f"plot: {png}")
    print(f"report: {report}")
    return 0
