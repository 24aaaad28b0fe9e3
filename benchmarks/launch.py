"""Launch cost of `megavla train`: command start -> worker processes -> first step -> steady state,
and a resume with nothing left to train, in one run.

    python benchmarks/launch.py [--nproc 2] [--steps 12] [--rounds 2] [--data DIR]

Runs the real command (`python -m megavla.cli train configs/demo.yaml ... --nproc N`, tiny preset,
ZeRO-2, fp32, the reader with 1 worker) on a small generated shard set (`megavla data synth` +
`megavla tokenizer train`, made once, not timed). Per round it reports, from the first metrics
record (the trainer's LaunchClock: wall and CPU seconds since the worker process started, per phase),
the worker's time to its first finished step; the command's wall time and the CPU-seconds of all its
processes (RUSAGE_CHILDREN); the steady-state step time (median of the later records' time/step_s,
the whole loop iteration); then the same command with `--resume auto` and nothing left to train.
The box is shared: the load average is printed before and after, and CPU-seconds are the figure
that compares across loads.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("imports", "process_group", "model", "engine", "loader", "first_step")


def make_data(out: Path) -> Path:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "megavla.cli", "data", "synth", "--out", str(out), "--scenes", "2",
                    "--tasks", "2", "--episodes-per-combo", "2", "--image-size", "32", "--no-progress"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "megavla.cli", "tokenizer", "train", "--shards", str(out), "--out",
                    str(out / "tokenizers")], check=True, env=env, stdout=subprocess.DEVNULL)
    return out


def timed(cmd: list[str]) -> tuple[float, float, int]:
    """(wall s, CPU-s of all child processes, exit code) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    code = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, code


def one_round(data: Path, run_dir: Path, nproc: int, steps: int) -> dict:
    cmd = [sys.executable, "-m", "megavla.cli", "train", "configs/demo.yaml", f"data.sources.robot={data}/robot",
           f"data.sources.human={data}/human", f"train.tokenizer_dir={data}/tokenizers", f"train.run_dir={run_dir}",
           f"train.steps={steps}", "train.log_every=1", "train.save_every=0", "train.progress=false",
           "train.tensorboard=false", "--nproc", str(nproc)]
    wall, cpu, code = timed(cmd)
    if code:
        raise RuntimeError(f"{' '.join(cmd)} exited with {code}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = records[0]
    steady = statistics.median(r["time/step_s"] for r in records[len(records) // 2:])
    resume_wall, resume_cpu, code = timed(cmd + ["--resume", "auto"])
    if code:
        raise RuntimeError(f"resume exited with {code}")
    return {"phases": {p: first.get(f"launch/{p}_s") for p in PHASES},
            "phases_cpu": {p: first.get(f"launch/{p}_cpu_s") for p in PHASES},
            "first_step_cpu": first.get("launch/first_step_cpu_s"), "command_wall": wall, "command_cpu": cpu,
            "steady_step_s": steady, "steps": steps, "resume_wall": resume_wall, "resume_cpu": resume_cpu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", type=Path, help="a shard dir made by a previous run (robot/, human/, tokenizers/)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_data(Path(tmp) / "data")
        rounds = [one_round(data, Path(tmp) / f"run{i}", args.nproc, args.steps) for i in range(args.rounds)]
    best = min(rounds, key=lambda r: r["phases"]["first_step"] or r["command_wall"])
    print(f"\nhost: {os.cpu_count()} cores, load average {load_before[0]:.1f} before / {os.getloadavg()[0]:.1f} "
          f"after; OMP_NUM_THREADS per worker = cores / nproc = {max(1, (os.cpu_count() or 1) // args.nproc)}; "
          f"tiny preset, ZeRO-2 fp32, {args.nproc} processes, reader 1 worker; best of {args.rounds} rounds "
          "(by first step)\n")
    print("| phase done (rank 0) | wall s since the worker process started | CPU-s of the worker so far |")
    print("|---|---|---|")
    for phase in PHASES:
        wall, cpu = best["phases"][phase], best["phases_cpu"][phase]
        print(f"| {phase} | {'n/a' if wall is None else f'{wall:.2f}'} | {'n/a' if cpu is None else f'{cpu:.2f}'} |")
    if best["phases"]["first_step"] is not None:
        print(f"\nfirst step: {best['phases']['first_step']:.2f} s wall, {best['first_step_cpu']:.2f} CPU-s "
              "(rank 0)")
    print(f"steady state {best['steady_step_s']:.3f} s/step (the whole loop iteration)")
    print(f"whole command ({best['steps']} steps): {best['command_wall']:.1f} s wall, {best['command_cpu']:.1f} "
          f"CPU-s over all processes = {best['command_cpu'] / max(best['steady_step_s'], 1e-9) / args.nproc:.0f} "
          "steady steps' worth of CPU")
    print(f"resume with nothing to train: {best['resume_wall']:.1f} s wall, {best['resume_cpu']:.1f} CPU-s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
