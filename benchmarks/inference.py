"""`sample_actions` latency with and without the pi0.5 subtask step (action_conditioning=subtask
vs instruction), KV-cached, one observation, on whatever device torch picks.

    python benchmarks/inference.py [--presets tiny small] [--repeats 5] [--flow-steps 10]

The real code path: the VLA from `build_model` (random weights), `VLA.sample_actions` on a
`random_batch` of 1 sample with `--cameras` cameras at the preset's image size. A random model never
emits EOS, so the subtask row is the worst case: all `model.subtask_len` tokens decoded (each one
backbone token over the KV cache) before the flow steps; `--subtask-tokens` sets that length.
Also timed: `predict_subtask` alone with the same length (prefix encode + the decode, no flow).
Prints a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import time


def time_call(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    import torch

    from megavla.config.model import ModelConfig
    from megavla.model.synthetic import random_batch
    from megavla.model.vla import build_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--flow-steps", type=int, default=10)
    p.add_argument("--subtask-tokens", type=int, default=16)
    p.add_argument("--cameras", type=int, default=3)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.flow_steps} flow steps, median of {args.repeats}\n")
    print("| preset | conditioning | sample_actions (ms) | predict_subtask alone (ms) | subtask tokens |")
    print("|---|---|---|---|---|")
    for preset in args.presets:
        rows = {}
        for conditioning in ("instruction", "subtask"):
            torch.manual_seed(0)
            cfg = ModelConfig(preset=preset, action_conditioning=conditioning, subtask_len=args.subtask_tokens)
            model = build_model(cfg).to(device).eval()
            batch = random_batch(model.cfg, batch_size=1, num_cameras=args.cameras).to(device)
            noise = torch.randn(batch.actions.shape, device=device)

            def sample():
                model.sample_actions(batch, num_steps=args.flow_steps, noise=noise)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            rows[conditioning] = time_call(sample, args.repeats)
            decode = None
            if conditioning == "subtask":
                decode = time_call(lambda: model.predict_subtask(batch, max_len=args.subtask_tokens), args.repeats)
            print(f"| {preset} | {conditioning} | {rows[conditioning] * 1e3:.1f} | "
                  f"{'-' if decode is None else f'{decode * 1e3:.1f}'} | "
                  f"{0 if conditioning == 'instruction' else args.subtask_tokens} |")
            del model


if __name__ == "__main__":
    main()
