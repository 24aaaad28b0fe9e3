"""``megavla experiment diversity | objectives | probe``: the paper's experiments, one command each.

    megavla experiment diversity --preset mini --out runs/exp/diversity
    megavla experiment objectives --preset mini --out runs/exp/objectives
    megavla experiment probe RUN_OR_CKPT... --out runs/exp/probe --combos 0:0,0:1
    megavla experiment closed-loop RUN_OR_CKPT --combos 0:0,1:1 --episodes-per-combo 4
    megavla experiment competence RUN_OR_CKPT --combos 0:0,0:1,0:2     # where grasps land; does it look
    megavla experiment closed-loop --policy-server ws://127.0.0.1:8000 --combos 0:0,1:1   # megavla serve

Knobs honoured by all three: ``--cameras head`` (wrist cameras off), ``--chunk-length H``,
``--human-weight W`` (human : robot mixture weight in co-finetuning; 1 = 50/50), ``--seeds N``
(diversity: every arm trained N times at the spec's seed_levels), and any dotted
``--set key=value`` of the experiment spec (configs/experiments/*.yaml; ``--set
overrides=[train.lr=1e-3]`` reaches every training run). Launch flags (``--executor slurm
--partition ...``) go to every sweep. Re-running a command skips finished runs, resumes interrupted
ones and reuses cached evaluations; with SLURM, re-run it once the submitted runs have finished.
Reports: ``OUT/report_<experiment>.md`` + ``OUT/results_<experiment>.json`` (diversity and
objectives may share one OUT: objectives then reuses the data and the 100 % pretrain run).
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from megavla.config import ConfigError, to_dict

from . import experiments as ex
from . import html_report, policy_cli, report
from .policy_cli import probe_section

log = logging.getLogger(__name__)

OBJECTIVE_VARIANTS = {  # model loss weights: high level = subtask + FAST tokens, low level = flow
    "high-level only": ["model.flow_weight=0.0"],
    "low-level only": ["model.subtask_weight=0.0", "model.fast_weight=0.0"],
    "both": [],
}


def _load(args: argparse.Namespace) -> ex.ExperimentSpec:
    spec = ex.load_spec(args.preset, list(args.set or []))
    if args.cameras:
        spec.overrides.append(f"data.cameras=[{args.cameras}]")
    if args.chunk_length:
        spec.overrides.append(f"data.chunk_length={args.chunk_length}")
    if args.human_weight is not None:
        spec.human_weight = float(args.human_weight)
    if args.seeds is not None:
        spec.seeds = int(args.seeds)
        spec.validate()
    if spec.human_weight <= 0:
        raise ConfigError(f"human_weight={spec.human_weight} must be > 0 (robot+human co-finetuning)")
    return spec


def _header(title: str, spec: ex.ExperimentSpec, argv: list[str], elapsed: float) -> list[str]:
    return [f"# {title}", "", f"Command: `megavla experiment {shlex.join(argv)}`  ", f"Wall time of this invocation: {elapsed / 60:.1f} min "
            "(runs and evaluations finished by earlier invocations are reused, not re-timed)", "",
            "<details><summary>experiment spec (resolved)</summary>", "", "```yaml",
            yaml.safe_dump(to_dict(spec), sort_keys=False).rstrip(), "```", "</details>", ""]


def diversity(spec: ex.ExperimentSpec, out: Path, launch: list[str], argv: list[str]) -> dict:
    from . import arms as arm_runs
    from . import progress_report
    start = time.perf_counter()
    data = arm_runs.prepare_data(spec, out / "data")
    n_seeds = {level: arm_runs.seeds_at(spec, level) for level in spec.diversity_levels}
    ckpts = [ex.pretrain(spec, data, out, [lv for lv in spec.diversity_levels if n_seeds[lv] > i], launch, i)
             for i in range(max(n_seeds.values()))]
    levels, run_dirs, arm_evals = {}, {}, {}
    for i, by_level in enumerate(ckpts):
        for name, ckpt in by_level.items():
            if ckpt is not None:
                run_dirs[f"pretrain_div-{name:g}{ex.seed_suffix(i)}"] = ckpt.parent.parent
    seen = ex.seen_combos(spec)
    for level in sorted(ckpts[0]):
        runs = arm_runs.run_level(spec, data, out, level, [ckpts[i][level] for i in range(n_seeds[level])], launch)
        arm_evals[level] = {}
        for arm, dirs in runs.items():
            arm_evals[level][arm] = [ex.evaluate_run(spec, d, spec.world.targets) for d in dirs]
            for i, d in enumerate(dirs):
                run_dirs[f"finetune_div-{level:g}_{arm}{ex.seed_suffix(i)}"] = d
        # Competence gate: can this level's robot-only policy do robot tasks it *was* finetuned on?
        levels[level] = {"robot": arm_runs.pool_evals(arm_evals[level]["robot"]),
                         "robot+human": arm_runs.pool_evals(arm_evals[level]["robot+human"]),
                         "seen": arm_runs.pool_evals([ex.evaluate_run(spec, d, seen, tag="seen")
                                                      for d in runs["robot"]]) if seen else None}
    progress_rows = progress_report.progress_rows(arm_evals, ex.finetune_combos(spec.world), spec.eval.alpha)
    progress_report.plot_progress_gap(progress_rows, out / "progress_gap.png")
    rows = report.transfer_gap_rows(levels, spec.eval.competence_threshold)
    verdict = report.transfer_verdict(rows, spec.eval.alpha)
    report.plot_transfer_gap(rows, out / "transfer_gap.png")
    probe = {}
    if spec.eval.probe:
        from .probe import run_probe
        probe = run_probe({f"div-{lv:g}_robot+human": levels[lv]["robot+human"]["run_dir"] for lv in sorted(levels)},
                          spec.world.targets, out / "probe", episodes_per_combo=spec.eval.probe_episodes_per_combo,
                          steps_per_episode=spec.eval.probe_steps_per_episode)
    report.copy_configs(run_dirs, out / "configs")
    results = {"experiment": "diversity", "targets": spec.world.targets,
               "finetune_combos": ex.finetune_combos(spec.world),
               "seen_combos": seen, "competence_threshold": spec.eval.competence_threshold,
               "rows": [{k: v for k, v in r.items() if not k.endswith("_cl")} for r in rows], "verdict": verdict,
               "runs": {k: str(v) for k, v in run_dirs.items()}, "evaluations": levels, "probe": probe,
               "progress": progress_rows, "seeds": {f"{lv:g}": n for lv, n in n_seeds.items()},
               "arm_evaluations": {f"{lv:g}": evs for lv, evs in arm_evals.items()}}
    coverage_lines = _coverage_section(spec, results)
    report.write_json(results, out / "results_diversity.json")
    lines = _header("Diversity ablation: human→robot transfer gap", spec, argv, time.perf_counter() - start)
    ev = spec.eval
    lines += ["## Verdict", "", verdict["summary"], "", *verdict["lines"], "",
              "## Transfer gap on the target combos " + ", ".join(spec.world.targets), "",
              "Robot data never shows the targets; in robot+human finetuning only human data shows them. "
              f"Success: closed-loop, robot, {ev.episodes_per_combo} episodes per combo "
              f"({ev.episodes_per_combo * len(spec.world.targets)} per target cell), Wilson 95% intervals. "
              f"Δ success: robot+human − robot only, Newcombe 95% interval; p: two-sided Fisher exact test "
              f"(exact at small n and at 0/n, where a z-test is not), Holm-corrected across the gated levels. "
              f"Gate: robot-only success on seen finetune combos {', '.join(seen) or '(none)'} "
              f"({ev.episodes_per_combo * len(seen)} episodes) must reach {ev.competence_threshold:.2f} "
              "for the level to get a verdict.", "",
              "Action MSE: offline, normalized units, held-out robot episodes of the targets, beside "
              "observation-blind baselines on the same targets and mask (zero = hold still; repeat previous = "
              "a[t-1] over the chunk; mean action (targets) = per-dim mean of these targets, hindsight; mean "
              "action (train) = the training data's mean action). A policy at or above a baseline learned "
              "nothing usable from its observation.", "", report.transfer_gap_markdown(rows), "",
              "![transfer gap](transfer_gap.png)", "",
              "## Goal-directed progress on the targets (rubric fixed before any run: docs/results.md)", "",
              "Per arm, every target episode of every training seed, scored from its per-step trace "
              "(traces_targets.npz beside each eval_targets.json): the instructed block approached first "
              "-> grasped (pushed) -> the fraction of the way to the instructed goal -> done; an episode "
              "that ends with a seen sibling task done scores 0 (did another task). Intervals: 95% "
              "hierarchical bootstrap (seeds, then episodes); p: seed-stratified permutation test, Holm "
              "across the levels of each comparison.", "", *progress_report.progress_verdict(progress_rows, spec.eval.alpha),
              "", progress_report.progress_markdown(progress_rows), "",
              "Transfer efficiency, (arm − robot only) / (positive control − robot only):", "",
              *(progress_report.efficiency_lines(progress_rows) or ["- no level ran the positive control"]), "",
              "![progress gap](progress_gap.png)", "", *coverage_lines]
    if probe:
        lines += probe_section(probe, "probe/")
    lines += ["Exact configs: `configs/` (one per run) and `sweeps/` (the sweep files that ran them).", ""]
    (out / "report_diversity.md").write_text("\n".join(lines))
    html_report.write_html_report(out / "report_diversity.md", run_dirs)  # + each cell's rollout videos
    return results


def _coverage_section(spec: ex.ExperimentSpec, results: dict) -> list[str]:
    """What each level's pretraining shares with the targets (megavla/eval/coverage.py); kept in the results."""
    from .coverage import coverage_markdown, coverage_rows
    universe = [c for c in ex.all_combos(spec.world) if c not in spec.world.targets]
    rows = coverage_rows(spec.world.targets, universe, spec.diversity_levels,
                         ex.run_config(spec, {}, []).get("data", {}))
    results["coverage"] = rows
    return ["## What pretraining shows of the targets", "",
            "Robot pretraining combos at each level that share a part with each target: the instructed block's "
            "colour (instructed; merely present in the scene), the motion, the goal's colour as the goal, and the "
            "exact instruction. Diversity can help transfer only through parts it adds.", "",
            coverage_markdown(rows), ""]


def objectives(spec: ex.ExperimentSpec, out: Path, launch: list[str], argv: list[str]) -> dict:
    from . import arms as arm_runs
    start = time.perf_counter()
    data = arm_runs.prepare_data(spec, out / "data")   # the control set too, as diversity (a shared OUT)
    level = max(spec.diversity_levels)
    init = ex.pretrain(spec, data, out, [level], launch)[level]
    evals, run_dirs = {}, {}
    for variant, extra in OBJECTIVE_VARIANTS.items():
        slug = "obj-" + variant.split()[0].replace("-level", "")
        runs = ex.finetune(spec, data, out, slug, init, {"data.mixture.human": [spec.human_weight]}, extra, launch)
        run_dir = Path(runs[0].cfg.train.run_dir)
        evals[variant] = ex.evaluate_run(spec, run_dir, spec.world.targets, subtask=True)
        run_dirs[f"finetune_{slug}"] = run_dir
    if init is not None:
        run_dirs[f"pretrain_div-{level:g}"] = init.parent.parent
    report.copy_configs(run_dirs, out / "configs")
    from .progress_report import fmt_ci, per_seed, score_run_eval
    from .stats import bootstrap_mean, compare_means
    cells = {variant: score_run_eval(ev, ex.seen_combos(spec)) for variant, ev in evals.items()}
    rows = []
    for variant, ev in evals.items():
        off = ev["offline"]
        base = off.get("baselines", {})
        rates = cells[variant]["rates"]
        rows.append([variant, report.fmt_rate(ev["closed_loop"]), fmt_ci(bootstrap_mean(per_seed([cells[variant]], "progress"))),
                     f"{rates['approached']:.2f} / {rates['grasped']:.2f} / {rates['did_another_task']:.2f}",
                     off["action_mse"],
                     " / ".join(report.fmt(base.get(k)) for k in ("zero", "repeat_previous", "mean_action")),
                     off["subtask_accuracy"], off["breakdown"]["ok"], off["breakdown"]["wrong_subtask"],
                     off["breakdown"]["wrong_motion"]])
    both = per_seed([cells["both"]], "progress")
    tests = {f"both - {v}": compare_means(both, per_seed([cells[v]], "progress")) for v in evals if v != "both"}
    results = {"experiment": "objectives", "targets": spec.world.targets, "evaluations": evals,
               "progress": {v: {k: c[k] for k in ("rubric_version", "episodes", "mean_progress", "rates")}
                            for v, c in cells.items()},
               "progress_tests": tests, "runs": {k: str(v) for k, v in run_dirs.items()}}
    report.write_json(results, out / "results_objectives.json")
    lines = _header("Objective ablation: high-level / low-level / both", spec, argv, time.perf_counter() - start)
    lines += [f"Finetuned (robot + human, human weight {spec.human_weight}) from the {level:.0%}-diversity "
              "pretrain checkpoint; evaluated on the targets. Breakdown over held-out robot steps: wrong "
              f"subtask = predicted subtask text differs from the annotation; wrong motion = subtask right but "
              f"action MSE > {spec.eval.motion_threshold}.", "",
              "Goal-directed progress: the rubric of docs/results.md (instructed block approached first within "
              "5 cm -> grasped or pushed -> fraction of the way to the instructed goal -> done), mean over the "
              "target episodes with a bootstrap 95 % interval; approached / grasped / did another task are rates.", "",
              report.markdown_table(["objective", "success [95% CI]", "progress [95% CI]",
                                     "approached / grasped / other task", "action MSE",
                                     "baselines: zero / repeat prev. / mean (targets)", "subtask acc.", "ok",
                                     "wrong subtask", "wrong motion"], rows), ""]
    lines += [f"- progress, {name}: {t['difference']:+.3f} [{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}], "
              f"permutation p {t['p_value']:.4f}" for name, t in tests.items()] + [""]
    (out / "report_objectives.md").write_text("\n".join(lines))
    html_report.write_html_report(out / "report_objectives.md", run_dirs)
    return results


# ------------------------------------------------------------------------ the experiments, registered
@dataclass(frozen=True)
class Experiment:
    """One `megavla experiment NAME`: its help line, its options, and run(args, argv) -> exit code.
    run checks its outputs before any episode or training run starts; ConfigError / ValueError
    (bad input) end the command with exit 2, RuntimeError with 3 (main)."""
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, list[str]], int]


EXPERIMENTS: dict[str, Experiment] = {}


def register_experiment(name: str, experiment: Experiment) -> None:
    """Add `megavla experiment NAME`; a second one of the same name is refused, not swapped in."""
    if name in EXPERIMENTS:
        raise ValueError(f"experiment {name!r} is already registered ({EXPERIMENTS[name].run.__module__})")
    EXPERIMENTS[name] = experiment


def _sweep_arguments(name: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        from megavla.launch.cli import add_launch_flags
        p.add_argument("--preset", default="mini", help="configs/experiments/<preset>.yaml or a YAML path: toy "
                       "(smoke test, minutes), mini (tiny model, < 90 min on 2 CPU cores), gpu (a few GPU-hours)")
        p.add_argument("--out", default=f"runs/experiments/{name}", help="report directory (runs live inside)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="dotted override of the experiment spec")
        p.add_argument("--cameras", help="comma-separated cameras, e.g. head (wrist cameras off)")
        p.add_argument("--chunk-length", type=int, help="action chunk length H (data and model)")
        p.add_argument("--human-weight", type=float, help="human mixture weight vs robot 1.0 (1 = 50/50)")
        p.add_argument("--seeds", type=int, help="train every arm this many times (train.seed / data.seed + i) "
                       "at the spec's seed_levels (empty: every level)")
        add_launch_flags(p)
    return add


def _sweep_experiment(body: Callable[[ex.ExperimentSpec, Path, list[str], list[str]], dict]):
    """run() of a sweep experiment (diversity, objectives): trains through sweeps, writes the report."""
    def run(args: argparse.Namespace, argv: list[str]) -> int:
        from megavla.launch.cli import flag_overrides
        spec = _load(args)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "spec.yaml").write_text(yaml.safe_dump(to_dict(spec), sort_keys=False))
        started = time.perf_counter()
        body(spec, out.resolve(), flag_overrides(args), argv)
        report_path = out / f"report_{args.experiment}.md"
        print(report_path.read_text())
        print(f"wall time: {(time.perf_counter() - started) / 60:.1f} min; results_{args.experiment}.json and "
              f"report_{args.experiment}.html (tables, figures, rollout videos) beside the report; "
              f"report: {report_path}")
        return 0
    return run


for _name, _body in (("diversity", diversity), ("objectives", objectives)):
    register_experiment(_name, Experiment(f"the {_name} experiment (sweeps of training runs + evaluation)",
                                          _sweep_arguments(_name), _sweep_experiment(_body)))
register_experiment("probe", Experiment("embodiment silhouette + t-SNE of backbone embeddings per checkpoint",
                                        policy_cli.probe_arguments, policy_cli.run_probe))
register_experiment("competence", Experiment(
    "where a run's grasps land relative to the instructed block, whether they follow its jitter, and how "
    "much the colour word moves its actions", policy_cli.competence_arguments, policy_cli.run_competence))
register_experiment("closed-loop", Experiment("mini-world success of one policy (in process or via megavla serve)",
                                              policy_cli.closed_loop_arguments, policy_cli.run_closed_loop))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megavla experiment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="experiment", required=True)
    for name, experiment in EXPERIMENTS.items():
        experiment.add_arguments(sub.add_parser(name, help=experiment.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return EXPERIMENTS[args.experiment].run(args, argv)
    except (ConfigError, ValueError) as e:  # CheckpointError and bad combos are ValueErrors
        sys.stderr.write(f"megavla experiment: error: {e}\n")
        return 2
    except RuntimeError as e:
        sys.stderr.write(f"megavla experiment: {e}\n")
        return 3
