"""Training step time, samples/s and peak memory per rank: plain PyTorch (1 process) versus
DeepSpeed ZeRO-0/2/3 (2 processes), tiny and small presets, in one run.

    python benchmarks/train_step.py [--presets tiny small] [--steps 5] [--batch 2]
    # one GPU (bf16, fused AdamW, SDPA/flash, MFU column):
    python benchmarks/train_step.py --presets small 1b --stages -1 0 2 --nproc 1 --batch 8 --steps 10

Every configuration runs the real code paths: the VLA from `build_model`, the DeepSpeed engine from
`megavla.train.engine.create_engine` (torch AdamW, fp32 on CPU / bf16 on GPU), one fixed synthetic
batch per rank (`megavla.model.synthetic.random_batch`, so the data pipeline does not count).
Step = forward + backward + optimizer step; the first 2 steps are warm-up and not timed (`--steps 0`:
build the model and the engine only, no step: the build-time peaks). Peak memory, per phase (after
the model build, after the engine (optimizer, ZeRO partitions), after the steps), is the process's
peak RSS so far on CPU (includes ~0.4 GB of torch/DeepSpeed import baseline) or peak CUDA
allocation on GPU. Every process uses 1 intra-op thread (set BENCH_PYTORCH_THREADS=2 to give the 1-process PyTorch run
both cores; on a busy shared box that measured 10x slower from OpenMP spin-waiting). Prints a
markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 2


def state_mb(*roots) -> float:
    """MB of distinct tensor storage reachable from the model / optimizer objects: parameters,
    gradients, fp32 master copies, Adam moments, ZeRO flat buffers and partitions -- the "model
    states" ZeRO partitions (peak RSS also holds activations and the import baseline)."""
    import torch
    seen_storage, seen_obj, total = set(), set(), 0

    def walk(obj, depth):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if obj.numel() and obj.untyped_storage().data_ptr() not in seen_storage:
                seen_storage.add(obj.untyped_storage().data_ptr())
                total += obj.untyped_storage().nbytes()
            if isinstance(obj, torch.nn.Parameter) or obj.grad is not None:
                walk(obj.grad, depth + 1)
                walk(getattr(obj, "ds_tensor", None), depth + 1)
            return
        if depth > 6 or id(obj) in seen_obj or obj is None or isinstance(obj, (str, int, float, bool)):
            return
        seen_obj.add(id(obj))
        if isinstance(obj, dict):
            for v in list(obj.values()):
                walk(v, depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for v in list(obj):
                walk(v, depth + 1)
        elif isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                walk(p, depth + 1)
        elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("torch", "deepspeed"):
            walk(vars(obj), depth + 1)

    for root in roots:
        walk(root, 0)
    return total / 2**20


def worker(args) -> None:
    import torch

    from megavla.config import ModelConfig, TrainConfig
    from megavla.model.synthetic import random_batch
    from megavla.model.vla import build_model
    from megavla.train.metrics import peak_memory_mb

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    mcfg = ModelConfig(preset=args.preset, kernels="auto", attention="auto" if cuda else "sdpa")
    tcfg = TrainConfig(zero_stage=max(0, args.stage), precision="bf16" if cuda else "fp32", warmup_steps=1,
                       zero3_init=not args.no_zero3_init, malloc_mmap_threshold_kb=args.malloc_mmap_threshold_kb)
    from megavla.train.host_memory import end_build_phase, set_mmap_threshold, start_build_phase
    set_mmap_threshold(tcfg.malloc_mmap_threshold_kb)     # as entry.run does, before anything is built
    build_phase = start_build_phase(tcfg.malloc_mmap_threshold_kb)   # until the engine is up, as entry.run
    rank = int(os.environ.get("RANK", "0"))
    if args.stage == 3 and tcfg.zero3_init:   # partitioned from the start (as entry.run builds it)
        from megavla.config import Config
        from megavla.train.engine import build_partitioned, init_distributed
        init_distributed()
        cfg = Config(model=mcfg, train=tcfg)
        model = build_partitioned(lambda c: build_model(c.model), cfg, args.batch,
                                  int(os.environ.get("WORLD_SIZE", "1")))
    else:
        model = build_model(mcfg)
    params_m = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters()) / 1e6
    peak_after_build = peak_memory_mb(torch.device("cuda" if cuda else "cpu"))
    if args.stage < 0:                      # plain PyTorch: no DeepSpeed, no process group
        device = torch.device("cuda" if cuda else "cpu")
        model.to(device)
        from megavla.train.optim import build_optimizer
        opt = build_optimizer(model, tcfg, device)

        def step(batch):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                loss = model(batch)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        from megavla.train.engine import create_engine, init_distributed
        dist = init_distributed()
        device = dist.device
        engine, _, _ = create_engine(model, tcfg, args.batch, dist)

        opt = engine.optimizer

        def step(batch):
            engine.backward(engine(batch)["loss"])
            engine.step()
    end_build_phase(build_phase, tcfg.zero_stage)
    peak_after_engine = peak_memory_mb(device)
    result = {"rank": rank, "build_peak_mb": peak_after_build, "engine_peak_mb": peak_after_engine,
              "state_mb": state_mb(model, opt), "params_m": params_m,
              "device": torch.cuda.get_device_name(device) if cuda else "cpu"}
    if args.steps == 0:    # build only: the peaks before any step
        Path(args.result).with_suffix(f".rank{rank}.json").write_text(json.dumps(result))
        return
    host_batch = random_batch(mcfg, batch_size=args.batch, seed=rank)
    from megavla.model.flops import batch_flops, flops_per_sample
    run_flops = batch_flops(mcfg, host_batch)              # this batch's valid tokens (the trainer's MFU)
    batch = host_batch.to(device)
    times = []
    for i in range(WARMUP + args.steps):
        t0 = time.perf_counter()
        step(batch)
        if cuda:
            torch.cuda.synchronize()
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    from megavla.train.metrics import peak_flops
    step_s = sum(times) / len(times)
    peak = peak_flops(device)
    result.update({"step_s": step_s, "peak_mb": peak_memory_mb(device),
              # MFU per device (GPU only): training FLOPs of the batch run / step time / dense bf16 peak.
              "mfu": run_flops / step_s / peak if peak else None,
              "tflops_s": run_flops / step_s / 1e12,
              # the config's nominal sample (3 cameras, text 48, ...) vs the batch actually run
              "nominal_over_run": flops_per_sample(mcfg) * args.batch / run_flops})
    Path(args.result).with_suffix(f".rank{rank}.json").write_text(json.dumps(result))


def run_config(preset: str, stage: int, nproc: int, steps: int, batch: int, tmp: Path,
               no_zero3_init: bool = False, malloc_mmap_threshold_kb: int | None = None) -> dict:
    if malloc_mmap_threshold_kb is None:
        from megavla.config import TrainConfig
        malloc_mmap_threshold_kb = TrainConfig().malloc_mmap_threshold_kb
    result = tmp / f"{preset}_{stage}_{nproc}"
    cmd = [__file__, "--worker", "--preset", preset, "--stage", str(stage), "--steps", str(steps),
           "--batch", str(batch), "--result", str(result), "--malloc-mmap-threshold-kb", str(malloc_mmap_threshold_kb)
           ] + (["--no-zero3-init"] if no_zero3_init else [])
    if nproc == 1:
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("BENCH_PYTORCH_THREADS", "1"))
        subprocess.run([sys.executable, *cmd], check=True, env=env, stdout=subprocess.DEVNULL)
    else:
        from megavla.train.cli import launch_local
        code = launch_local(nproc, cmd[1:], command=[sys.executable, __file__])
        if code:
            raise RuntimeError(f"{preset} ZeRO-{stage}: workers exited with {code}")
    ranks = [json.loads(result.with_suffix(f".rank{r}.json").read_text()) for r in range(nproc)]
    mode = "PyTorch" if stage < 0 else f"DeepSpeed ZeRO-{stage}" + (
        " (zero.Init)" if stage == 3 and not no_zero3_init else "")
    # The step's figures; None for a build-only run (--steps 0).
    timed = dict.fromkeys(("step_s", "samples_s", "peak_mb", "mfu", "tflops_s", "nominal_over_run"))
    if steps:
        step_s = max(r["step_s"] for r in ranks)           # ranks run in lockstep; the slowest paces
        timed.update(step_s=step_s, samples_s=batch * nproc / step_s, peak_mb=[round(r["peak_mb"]) for r in ranks],
                     mfu=ranks[0]["mfu"], tflops_s=sum(r["tflops_s"] for r in ranks) / nproc,
                     nominal_over_run=ranks[0]["nominal_over_run"])
    return {"preset": preset, "mode": mode, "nproc": nproc, "params_m": ranks[0]["params_m"],
            "build_peak_mb": [round(r["build_peak_mb"]) for r in ranks],
            "engine_peak_mb": [round(r["engine_peak_mb"]) for r in ranks],
            "state_mb": [round(r["state_mb"]) for r in ranks], "device": ranks[0]["device"],
            "malloc_mmap_threshold_kb": malloc_mmap_threshold_kb, **timed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--stages", nargs="+", type=int, default=[-1, 0, 2, 3], help="-1 = plain PyTorch")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steps (after 2 warm-up steps); 0 = build the model and engine only")
    parser.add_argument("--batch", type=int, default=2, help="micro batch per process")
    parser.add_argument("--nproc", type=int, nargs="+", default=[2],
                        help="processes for the DeepSpeed rows (= GPUs on a GPU box); several = one row each")
    parser.add_argument("--malloc-mmap-threshold-kb", type=int, default=None,
                        help="train.malloc_mmap_threshold_kb for every process (default: the config's; "
                             "0 = glibc's dynamic threshold, the behaviour before it existed)")
    parser.add_argument("--no-zero3-init", action="store_true",
                        help="ZeRO-3 rows: build the whole model on every rank first (train.zero3_init=false)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            for stage in args.stages:
                for nproc in [1] if stage < 0 else args.nproc:
                    row = run_config(preset, stage, nproc, args.steps, args.batch, Path(tmp),
                                     args.no_zero3_init, args.malloc_mmap_threshold_kb)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    rows.append(row)
    print(f"\ndevice {rows[0]['device']}, micro batch {args.batch} per process, {args.steps} timed steps, "
          f"cpu_count={os.cpu_count()}, malloc_mmap_threshold_kb={rows[0]['malloc_mmap_threshold_kb']}, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end\n")
    print("FLOPs: of the batch actually run (megavla.model.flops.batch_flops: valid tokens of the synthetic "
          "batch); 'nominal / run' = how much the config's nominal sample would overstate them.\n")
    print("| preset | params (M) | mode | procs | step (s) | samples/s | TFLOP/s per proc | MFU "
          "| nominal / run FLOPs | model states per rank (MB) | peak RSS per rank after the model build (MB) "
          "| after the engine (MB) | peak RSS per rank (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
        print(f"| {r['preset']} | {r['params_m']:.1f} | {r['mode']} | {r['nproc']} | {fmt(r['step_s'], '.3f')} | "
              f"{fmt(r['samples_s'], '.2f')} | {fmt(r['tflops_s'], '.4f')} | {mfu} | "
              f"{fmt(r['nominal_over_run'], '.2f')}{'' if r['nominal_over_run'] is None else 'x'} | "
              f"{' / '.join(map(str, r['state_mb']))} | "
              f"{' / '.join(map(str, r['build_peak_mb']))} | {' / '.join(map(str, r['engine_peak_mb']))} | "
              f"{' / '.join(map(str, r['peak_mb'] or ['n/a']))} |")


if __name__ == "__main__":
    main()
