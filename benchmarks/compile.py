"""torch.compile vs eager (`train.compile`, megavla/model/compile.py): training samples per CPU-s,
first-compile time cold and warm, and `sample_actions` latency, eager vs compiled, in one run.

    python benchmarks/compile.py [--presets tiny small] [--rounds 6] [--steps 10] [--batch 8]
    # quick check that it runs (numbers are not timings):
    python benchmarks/compile.py --presets tiny --steps 1 --rounds 2 --repeats 1 --cold-presets

Training: one process per (preset, mode, cache), 1 intra-op thread, plain PyTorch (the VLA from
`build_model` + torch's fused AdamW as the trainer's train.optimizer=auto, fp32, no DeepSpeed, no data
pipeline: one fixed `random_batch` of `--batch` samples, `--cameras` cameras and `--lengths` token
columns: by default those of the mini experiment's finetune batches). The process builds the eager
model and its `train.compile` twin (`compile_model`, same initial weights; the first losses are
checked equal), then times them in alternating rounds of `--steps` steps: ms/step (wall) and samples
per CPU-s (process CPU time; on a GPU read ms/step). "x eager" is the median over rounds of eager
CPU-s / compiled CPU-s, with its range. First step = the compiled model's forward + backward +
optimizer step including compiling; `compile s` is what torch's compile metrics count of it. "cold":
a fresh, empty inductor cache directory (a first run on a machine); "warm": a second process on that
directory (every later run); "user": the user's own cache (/tmp/torchinductor_$USER, as training).
"ceiling" (CPU): 1 / the share of the eager step's CPU time in dense ops (profiled): compiling fuses
and removes the rest, not matmuls, so no compile mode can beat it.

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


# aten ops that do the dense arithmetic: compiling makes none of them faster, so the eager step's
# time outside them bounds what compiling can gain.
DENSE_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product",
             "aten::convolution", "aten::mkldnn_convolution", "aten::linear")


def dense_seconds(model, step) -> tuple[float, float]:
    """(self CPU-s of the dense ops, total self CPU-s) over 3 steps under the torch profiler."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    dense = sum(e.self_cpu_time_total for e in events if e.key.startswith(DENSE_OPS))
    return dense / 3e6, total / 3e6


def train_worker(preset: str, mode: str, steps: int, rounds: int, batch_size: int, cameras: int,
                 lengths: list[int]) -> dict:
    """Eager and ``mode`` in one process on the same batch, timed in alternating rounds (the VM's
    noise hits both alike); the ratio is the median over rounds of eager CPU-s / compiled CPU-s."""
    import torch
    torch.set_num_threads(1)
    from megavla.config.model import ModelConfig
    from megavla.model.compile import compile_model, compile_seconds
    from megavla.model.synthetic import random_batch
    from megavla.model.vla import build_model
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelConfig(preset=preset, action_conditioning="instruction", **KERNELS[device.type])
    models = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        models[name] = build_model(cfg).to(device).train()
    text_len, subtask_len, fast_len = lengths
    batch = random_batch(models["eager"].cfg, batch_size=batch_size, num_cameras=cameras, text_len=text_len,
                         subtask_len=subtask_len, fast_len=fast_len).to(device)

    def make_step(model):
        # the trainer's optimizer (train.optimizer=auto: torch's fused AdamW, on a CPU too)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step(noise=None, time=None) -> float:
            loss = model(batch, noise, time)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss)   # a host read: the step has ended (on a GPU too)
        return step

    steps_fn = {name: make_step(m) for name, m in models.items()}
    compile_model(models["compiled"], mode)
    noise = torch.randn(batch.actions.shape, device=device)
    flow_time = torch.rand(batch_size, device=device)
    t0 = time.perf_counter()
    first_loss = steps_fn["compiled"](noise, flow_time)
    first = time.perf_counter() - t0
    eager_loss = steps_fn["eager"](noise, flow_time)
    assert abs(first_loss - eager_loss) <= 1e-4 * abs(eager_loss) + 1e-5, f"compiled loss {first_loss} != eager {eager_loss}"
    for _ in range(WARMUP):
        for fn in steps_fn.values():
            fn()
    cpu = {name: [] for name in steps_fn}
    wall = {name: [] for name in steps_fn}
    for r in range(rounds):
        for name in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):
            w, c = time.perf_counter(), time.process_time()
            for _ in range(steps):
                steps_fn[name]()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    ratios = [e / c for e, c in zip(cpu["eager"], cpu["compiled"])]
    out = {"first_s": first, "compile_s": compile_seconds(), "ratio": statistics.median(ratios),
           "ratio_min": min(ratios), "ratio_max": max(ratios)}
    for name in steps_fn:
        out[name] = {"ms_per_step": statistics.median(wall[name]) / steps * 1e3,
                     "samples_per_cpu_s": steps * batch_size / statistics.median(cpu[name])}
    if device.type == "cpu":
        dense, total = dense_seconds(models["eager"], steps_fn["eager"])
        out["eager_dense_share"] = dense / total
    return out


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
    p.add_argument("--steps", type=int, default=10, help="training steps per timed round")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds per model (eager and compiled alternate)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cameras", type=int, default=3)
    p.add_argument("--lengths", type=int, nargs=3, default=[16, 6, 80], metavar=("TEXT", "SUBTASK", "FAST"),
                   help="token columns of the batch (default: the mini experiment's finetune batches)")
    p.add_argument("--repeats", type=int, default=10, help="timed sample_actions calls")
    p.add_argument("--flow-steps", type=int, default=10)
    p.add_argument("--modes", nargs="+", default=["blocks", "full"], choices=MODES[1:],
                   help="train.compile modes to time against eager")
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
    print(f"torch {torch.__version__}, {where}, fp32, batch {args.batch}, {args.cameras} cameras, tokens "
          f"text/subtask/FAST {'/'.join(map(str, args.lengths))}, {args.rounds} rounds of {args.steps} steps "
          "per model, eager and compiled alternating in one process\n")
    print("| preset | compile | cache | first step (s) | compile (s) | ms/step eager | ms/step compiled | "
          "samples/CPU-s eager | samples/CPU-s compiled | x eager (median [min, max]) | ceiling |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        for mode in args.modes:
            work = [preset, mode, args.steps, args.rounds, args.batch, args.cameras, args.lengths]
            runs = [("user", run_worker("train", work))]
            if preset in args.cold_presets:
                with tempfile.TemporaryDirectory(prefix="inductor-cold-") as fresh:
                    runs += [(cache, run_worker("train", work, fresh)) for cache in ("cold", "warm")]
            for cache, r in runs:
                e, c = r["eager"], r["compiled"]
                ceiling = f"{1 / r['eager_dense_share']:.2f}" if "eager_dense_share" in r else "n/a"
                print(f"| {preset} | {mode} | {cache} | {r['first_s']:.1f} | {r['compile_s']:.1f} | "
                      f"{e['ms_per_step']:.1f} | {c['ms_per_step']:.1f} | {e['samples_per_cpu_s']:.3g} | "
                      f"{c['samples_per_cpu_s']:.3g} | {r['ratio']:.2f} [{r['ratio_min']:.2f}, {r['ratio_max']:.2f}] | "
                      f"{ceiling} |", flush=True)
    print("\nceiling: eager step CPU time / the part of it in dense ops (matmul, attention, convolution), "
          "which compiling leaves as they are: the ratio if everything else took no time")
    print(f"\nsample_actions, 1 observation, instruction-conditioned actions, {args.flow_steps} flow steps, median of "
          f"{args.repeats} (first call = the compile, user's cache)\n")
    print("| preset | eager (ms) | compiled (ms) | x eager latency | compiled first call (s) |")
    print("|---|---|---|---|---|")
    for preset in args.presets:
        r = run_worker("infer", [preset, args.repeats, args.flow_steps, args.cameras])
        print(f"| {preset} | {r['eager']['ms']:.1f} | {r['compiled']['ms']:.1f} | "
              f"{r['compiled']['ms'] / r['eager']['ms']:.2f} | {r['compiled']['first_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
