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
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from megavla.config import ConfigError, to_dict

from . import experiments as ex
from . import html_report, report
from .traces import save_traces, traces_path

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
    data = ex.prepare_data(spec, out / "data")
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
        lines += _probe_section(probe, "probe/")
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


def _probe_section(probe: dict, prefix: str) -> list[str]:
    lines = ["## Representation alignment (embodiment silhouette, lower = more aligned)", "",
             report.markdown_table(["checkpoint", "step", "silhouette", "observations"],
                                   [[name, p["step"], p["silhouette"], p["samples"]] for name, p in probe.items()]), ""]
    lines += [f"![{name}]({prefix}{p['plot']})" for name, p in probe.items() if p.get("plot")]
    return lines + [""]


def objectives(spec: ex.ExperimentSpec, out: Path, launch: list[str], argv: list[str]) -> dict:
    start = time.perf_counter()
    data = ex.prepare_data(spec, out / "data")
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


# What `experiment probe` writes into --out (probe.run_probe and probe_command).
PROBE_OUTPUTS = ("results_probe.json", "report_probe.md", "embeddings_*.npy", "labels_*.json", "tsne_*.png")


def probe_command(args: argparse.Namespace, argv: list[str]) -> dict:
    from .probe import run_probe
    out = Path(args.out)
    combos = [c.strip() for c in args.combos.split(",") if c.strip()]
    names = {}
    for ckpt in args.checkpoints:
        name = "/".join(Path(ckpt).resolve().parts[-2:])
        names[name] = ckpt
    probe = run_probe(names, combos, out, episodes_per_combo=args.episodes_per_combo,
                      steps_per_episode=args.steps_per_episode)
    report.write_json({"experiment": "probe", "combos": combos, "probe": probe}, out / "results_probe.json")
    lines = ["# Representation-alignment probe", "", f"Command: `megavla experiment {shlex.join(argv)}`", "",
             f"Robot and human observations of combos {', '.join(combos)}.", ""]
    (out / "report_probe.md").write_text("\n".join(lines + _probe_section(probe, "")))
    return probe


def closed_loop_command(args: argparse.Namespace, traces: list | None = None, videos=None) -> dict:
    """Mini-world success of one policy, in process (a checkpoint) or over the wire (``megavla
    serve`` through the unmodified ``openpi_client``). Same seeds, same noise stream: same result."""
    from . import closed_loop
    combos = [c.strip() for c in args.combos.split(",") if c.strip()]
    if (args.checkpoint is None) == (args.policy_server is None):
        raise ValueError("give either a checkpoint (in process) or --policy-server ws://HOST:PORT")
    if args.policy_server:
        policy = closed_loop.connect_policy_server(args.policy_server, args.api_key, args.execute_k)
        image_size = int(policy.metadata["image_size"])
    else:
        from .policy import VLAPolicy, load_checkpoint
        loaded = load_checkpoint(args.checkpoint, weights=args.weights)
        policy = VLAPolicy(loaded, execute_k=args.execute_k, num_steps=args.flow_steps, seed=args.noise_seed,
                           noise_scale=args.noise_scale)
        image_size = loaded.cfg.data.image_size
    try:
        return closed_loop.evaluate(policy, combos, args.episodes_per_combo, image_size=image_size,
                                    max_steps=args.max_steps, seed=args.seed, traces=traces, videos=videos)
    finally:
        if args.policy_server:
            policy.close()


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


def _probe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="+", help="run dirs, checkpoint dirs or exported dirs")
    p.add_argument("--out", default="runs/experiments/probe")
    p.add_argument("--combos", default="0:0,0:1,1:0,1:1", help="scene:task combos to observe")
    p.add_argument("--episodes-per-combo", type=int, default=2)
    p.add_argument("--steps-per-episode", type=int, default=6)
    p.add_argument("--overwrite", action="store_true", help="replace the results in a non-empty --out")


def _run_probe(args: argparse.Namespace, argv: list[str]) -> int:
    from megavla.overwrite import refuse_existing
    from .threads import use_inference_threads
    if args.out:   # before any episode runs
        refuse_existing(args.out, args.overwrite, "probe results", PROBE_OUTPUTS)
    use_inference_threads(getattr(args, "threads", None))   # in-process inference: the one threads rule
    probe = probe_command(args, argv)
    for name, p in probe.items():
        print(f"{name}: silhouette {p['silhouette']:.4f} ({p['samples']} observations)")
    print(f"report: {Path(args.out) / 'report_probe.md'}")
    return 0


def _competence_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run dir, checkpoint dir or export dir")
    p.add_argument("--combos", default="0:0,0:1,0:2", help="scene:task combos, comma-separated")
    p.add_argument("--episodes-per-combo", type=int, default=10, help="on the evaluation's start states")
    p.add_argument("--swap-episodes", type=int, default=3, help="start states per combo for the word swaps")
    p.add_argument("--execute-k", type=int, default=5)
    p.add_argument("--flow-steps", type=int, default=10)
    p.add_argument("--noise-scale", type=float, default=0.0, help="0 = the deterministic flow (the mini preset's)")
    p.add_argument("--max-steps", type=int, default=90)
    p.add_argument("--out", help="write the result to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def _run_competence(args: argparse.Namespace, argv: list[str]) -> int:
    from megavla.overwrite import refuse_existing
    from .competence import competence, competence_lines
    from .threads import use_inference_threads
    if args.out:   # before any episode runs
        refuse_existing(args.out, args.overwrite, "a competence result")
    use_inference_threads(getattr(args, "threads", None))
    res = competence(args.run, [c.strip() for c in args.combos.split(",") if c.strip()],
                     args.episodes_per_combo, execute_k=args.execute_k, flow_steps=args.flow_steps,
                     noise_scale=args.noise_scale, max_steps=args.max_steps, swap_episodes=args.swap_episodes)
    print("\n".join(competence_lines(res)))
    if args.out:
        report.write_json(res, Path(args.out))
    return 0


def _closed_loop_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", help="run dir, checkpoint dir or export dir (in process)")
    p.add_argument("--policy-server", help="ws://HOST:PORT of `megavla serve` (flow steps and noise seed "
                                           "are the server's --flow-steps / --seed)")
    p.add_argument("--api-key", default=os.environ.get("MEGAVLA_API_KEY"), help="the server's API key")
    p.add_argument("--combos", default="0:0", help="scene:task combos, comma-separated")
    p.add_argument("--episodes-per-combo", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="evaluation seed (which start states)")
    p.add_argument("--noise-seed", type=int, default=0, help="in process: the flow noise seed (= serve --seed)")
    p.add_argument("--execute-k", type=int, default=5, help="actions executed per predicted chunk")
    p.add_argument("--flow-steps", type=int, default=10, help="in process: Euler steps (= serve --flow-steps)")
    p.add_argument("--noise-scale", type=float, default=1.0,
                   help="in process: scale of the flow's starting noise (1 = as trained, 0 = deterministic)")
    p.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                   help="in process: the run's EMA weights (auto: when it kept them) or the raw ones")
    p.add_argument("--max-steps", type=int, default=90)
    p.add_argument("--out", help="write the result (every episode) to this JSON file, and the per-step "
                                 "traces beside it (NAME.traces.npz)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--videos", type=int, default=0, metavar="N", help="MP4 of the first N episodes per combo, "
                   "every camera side by side, beside --out (NAME.videos/; megavla/eval/videos.py)")
    p.add_argument("--threads", type=int, default=None, help="in process: torch CPU threads (default 1, or "
                   "OMP_NUM_THREADS when set; 0 = torch's own; megavla/eval/threads.py)")


def _run_closed_loop(args: argparse.Namespace, argv: list[str]) -> int:
    from megavla.overwrite import refuse_existing
    from .threads import use_inference_threads
    from .videos import VideoRecorder, clear_videos, videos_dir
    if args.out:   # before any episode runs
        for path in (Path(args.out), traces_path(args.out)):
            refuse_existing(path, args.overwrite, "a closed-loop result")
    if args.videos:
        if args.videos < 0 or not args.out:
            raise ValueError(f"--videos {args.videos}: give N > 0 and --out FILE.json (videos go beside it)")
        refuse_existing(videos_dir(args.out), args.overwrite, "closed-loop videos", ("*.mp4",))
        clear_videos(videos_dir(args.out))  # only with --overwrite: a re-run replaces its videos
    use_inference_threads(getattr(args, "threads", None))
    traces: list = []
    recorder = VideoRecorder(videos_dir(args.out), first_per_combo=args.videos) if args.videos else None
    res = closed_loop_command(args, traces, recorder)
    lo, hi = res["ci95"]
    print(f"success {res['successes']}/{res['episodes']} = {res['success_rate']:.3f} "
          f"[95% CI {lo:.3f}, {hi:.3f}]")
    for combo, block in res["per_combo"].items():
        print(f"  {combo}: {block['successes']}/{block['episodes']}")
    if args.out:  # the per-step traces beside the result (traces.load_traces reads them)
        res["traces"] = save_traces(traces, traces_path(args.out)).name
        if recorder is not None:
            res["videos"] = recorder.videos
            print(f"videos: {len(recorder.videos)} in {videos_dir(args.out)} "
                  f"({sum(v['bytes'] for v in recorder.videos)} bytes)")
        report.write_json(res, Path(args.out))
    return 0


for _name, _body in (("diversity", diversity), ("objectives", objectives)):
    register_experiment(_name, Experiment(f"the {_name} experiment (sweeps of training runs + evaluation)",
                                          _sweep_arguments(_name), _sweep_experiment(_body)))
register_experiment("probe", Experiment("embodiment silhouette + t-SNE of backbone embeddings per checkpoint",
                                        _probe_arguments, _run_probe))
register_experiment("competence", Experiment(
    "where a run's grasps land relative to the instructed block, whether they follow its jitter, and how "
    "much the colour word moves its actions", _competence_arguments, _run_competence))
register_experiment("closed-loop", Experiment("mini-world success of one policy (in process or via megavla serve)",
                                              _closed_loop_arguments, _run_closed_loop))


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
