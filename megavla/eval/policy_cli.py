"""``megavla experiment probe | competence | closed-loop``: the experiment commands that evaluate
given policies (a run, checkpoint or export dir in process, or `megavla serve` over the wire), as
opposed to the sweep experiments (diversity, objectives) that train them. Each is an
``*_arguments(parser)`` + ``run_*(args, argv) -> exit code`` pair, registered in eval/cli.py.
"""
from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from . import report
from .traces import save_traces, traces_path


def probe_section(probe: dict, prefix: str) -> list[str]:
    lines = ["## Representation alignment (embodiment silhouette, lower = more aligned)", "",
             report.markdown_table(["checkpoint", "step", "silhouette", "observations"],
                                   [[name, p["step"], p["silhouette"], p["samples"]] for name, p in probe.items()]), ""]
    lines += [f"![{name}]({prefix}{p['plot']})" for name, p in probe.items() if p.get("plot")]
    return lines + [""]


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
    (out / "report_probe.md").write_text("\n".join(lines + probe_section(probe, "")))
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


def probe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="+", help="run dirs, checkpoint dirs or exported dirs")
    p.add_argument("--out", default="runs/experiments/probe")
    p.add_argument("--combos", default="0:0,0:1,1:0,1:1", help="scene:task combos to observe")
    p.add_argument("--episodes-per-combo", type=int, default=2)
    p.add_argument("--steps-per-episode", type=int, default=6)
    p.add_argument("--overwrite", action="store_true", help="replace the results in a non-empty --out")


def run_probe(args: argparse.Namespace, argv: list[str]) -> int:
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


def competence_arguments(p: argparse.ArgumentParser) -> None:
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


def run_competence(args: argparse.Namespace, argv: list[str]) -> int:
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


def closed_loop_arguments(p: argparse.ArgumentParser) -> None:
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


def run_closed_loop(args: argparse.Namespace, argv: list[str]) -> int:
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
