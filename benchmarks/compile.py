"""torch.compile vs eager (`train.compile`, megavla/model/compile.py): training samples per CPU-s,
first-compile time cold and warm, and `sample_actions` latency, eager vs compiled, in one run.

    python benchmarks/compile.py [--presets tiny small] [--steps 30] [--batch 8] [--cold-presets tiny]
    # quick check that it runs (numbers are not timings):
    python benchmarks/compile.py --presets tiny --steps 2 --repeats 1 --cold-presets

Training: one process per (preset, mode), 1 intra-op thread, plain PyTorch (the VLA from
`build_model` + torch AdamW, fp32, no DeepSpeed, no data pipeline: one fixed `random_batch` of
`--batch` samples with `--cameras` cameras), modes eager / blocks / full as `train.compile` applies
them (`compile_model`). First step = forward + backward + optimizer step including compiling;
`compile s` is what torch's compile metrics count of it; then `--steps` timed steps after 2 warm-up
steps: ms/step (wall) and samples per CPU-s (process CPU time; on a GPU, where the work is not
the CPU's, read ms/step: the GPU runs the repo's default kernels there). Ratios are against eager of the same
preset in the same run. "cold": a fresh, empty inductor cache directory (a first run on a machine);
"warm": a second process on that directory (every later run); the rows without the word use the
user's own cache (/tmp/torchinductor_$USER, as training does), whatever it holds.

Inference: `sample_actions` of one observation (KV cache, `--flow-steps` steps), the model's eager
method vs `CompiledSampler` (what `load_policy(compile=True)` / `megavla serve --compile` run),
median of `--repeats` after a warm-up call that compiles; checked equal (fp32 tolerance).
Prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

WARMUP = 2
MODES = ("none", "blocks", "full")
# The repo's kernels per device: plain torch + SDPA on a CPU, the defaults (Triton, flash) on a GPU.
KERNELS = {"cpu": {"kernels": "torch", "attention": "sdpa"}, "cuda": {}}


def train_worker(preset: str, mode: str, steps: int, batch_size: int, cameras: int) -> dict:
    import torch
    torch.set_num_threads(1)
    from megavla.config.model import ModelConfig
    from megavla.model.synthetic import random_batch
    from megavla.model.vla import build_model
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(ModelConfig(preset=preset, **KERNELS[device.type])).to(device).train()
    if mode != "none":
        from megavla.model.compile import compile_model
        compile_model(model, mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = random_batch(model.cfg, batch_size=batch_size, num_cameras=cameras).to(device)

    def step() -> float:
        loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)   # a host read: the step has ended (on a GPU too)

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    for _ in range(WARMUP - 1):
        step()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    from megavla.model.compile import compile_seconds
    return {"first_s": first, "compile_s": compile_seconds(), "ms_per_step": wall / steps * 1e3,
            "samples_per_cpu_s": steps * batch_size / max(cpu, 1e-9)}


def infer_worker(preset: str, repeats: int, flow_steps: int, cameras: int) -> dict:
    import torch
    torch.set_num_threads(1)
    from megavla.config.model import ModelConfig
    from megavla.model.compile import CompiledSampler
    from megavla.model.synthetic import random_batch
    from megavla.model.vla import build_model
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Instruction-conditioned actions (the experiment presets'): a subtask-conditioned model (the tiny
    # preset's default) samples eagerly inside CompiledSampler, so timing it would compare eager to eager.
    model = build_model(ModelConfig(preset=preset, action_conditioning="instruction",
                                    **KERNELS[device.type])).to(device).eval()
    assert not model.actions_read_subtask
    batch = random_batch(model.cfg, batch_size=1, num_cameras=cameras).to(device)
    noise = torch.randn(batch.actions.shape, device=device)
    sampler = CompiledSampler(model)
    out = {}
    for name, fn in (("eager", model.sample_actions), ("compiled", sampler.sample_actions)):
        t0 = time.perf_counter()
        result = fn(batch, num_steps=flow_steps, noise=noise).cpu()
        first = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(batch, num_steps=flow_steps, noise=noise).cpu()   # .cpu(): the call has ended (GPU too)
            times.append(time.perf_counter() - t0)
        out[name] = {"first_s": first, "ms": statistics.median(times) * 1e3, "actions": result}
    torch.testing.assert_close(out["compiled"].pop("actions"), out["eager"].pop("actions"), rtol=1e-4, atol=1e-5)
    return out


def run_worker(kind: str, args: list, cache_dir: str | None = None) -> dict:
    env = dict(os.environ)
    if cache_dir:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps([kind, *args])], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{kind} worker {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--steps", type=int, default=30, help="timed training steps per mode (after 2 warm-up)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cameras", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10, help="timed sample_actions calls")
    p.add_argument("--flow-steps", type=int, default=10)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="train.compile modes to time")
    p.add_argument("--cold-presets", nargs="*", default=["tiny"],
                   help="presets whose compiled modes also run cold + warm on a fresh cache directory")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, *rest = json.loads(args.worker)
        print(json.dumps((train_worker if kind == "train" else infer_worker)(*rest)))
        return
    import torch
    where = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU, 1 thread per process"
    print(f"torch {torch.__version__}, {where}, 1 process per row, fp32, batch {args.batch}, "
          f"{args.cameras} cameras, {args.steps} timed steps\n")
    print("| preset | compile | cache | first step (s) | compile (s) | ms/step | samples/CPU-s | x eager |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        runs = []
        for mode in ["none"] + [m for m in args.modes if m != "none"]:
            runs.append((mode, "user", run_worker("train", [preset, mode, args.steps, args.batch, args.cameras])))
            if mode != "none" and preset in args.cold_presets:
                with tempfile.TemporaryDirectory(prefix="inductor-cold-") as fresh:
                    for cache in ("cold", "warm"):
                        runs.append((mode, cache, run_worker("train", [preset, mode, args.steps, args.batch,
                                                                       args.cameras], fresh)))
        eager = runs[0][2]["samples_per_cpu_s"]
        for mode, cache, r in runs:
            print(f"| {preset} | {mode} | {cache} | {r['first_s']:.1f} | {r['compile_s']:.1f} | "
                  f"{r['ms_per_step']:.1f} | {r['samples_per_cpu_s']:.0f} | {r['samples_per_cpu_s'] / eager:.2f} |",
                  flush=True)
    print(f"\nsample_actions, 1 observation, instruction-conditioned actions, {args.flow_steps} flow steps, median of {args.repeats} "
          "(first call = the compile, user's cache)\n")
    print("| preset | eager (ms) | compiled (ms) | x eager latency | compiled first call (s) |")
    print("|---|---|---|---|---|")
    for preset in args.presets:
        r = run_worker("infer", [preset, args.repeats, args.flow_steps, args.cameras])
        print(f"| {preset} | {r['eager']['ms']:.1f} | {r['compiled']['ms']:.1f} | "
              f"{r['compiled']['ms'] / r['eager']['ms']:.2f} | {r['compiled']['first_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
