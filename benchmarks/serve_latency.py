"""Policy-server latency per batch size: `megavla serve` driven by N concurrent openpi clients.

    python benchmarks/serve_latency.py [--preset tiny] [--clients 1 2 4 8] [--requests 30]
    python benchmarks/serve_latency.py --preset small --image-size 224 --clients 1 2 4 --requests 6
    python benchmarks/serve_latency.py --preset pi05-3b --device cuda --dtype bf16   # on a GPU

Real code path end to end: a random-weight export (megavla.serving.random_export, so the numbers
are those of the architecture, not of a trained model), `python -m megavla.cli serve` in its own
process on 127.0.0.1, and N threads each running an unmodified
``openpi_client.WebsocketClientPolicy`` in a closed loop (send, wait for the reply, send again) with
mini-world renders at the model's image size and three cameras. Per concurrency level the first
round of requests is warm-up. Columns: the batch sizes the server formed (from each reply's
``server_timing.batch_size``), client round-trip percentiles (serialization + loopback + queue +
inference), the server's inference time per batch (batch building + KV-cached ``sample_actions``),
and throughput. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def start_server(export: Path, args) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "megavla.cli", "serve", str(export), "--port", "0", "--device", args.device,
           "--dtype", args.dtype,
           "--flow-steps", str(args.flow_steps), "--max-batch", str(max(args.clients)),
           "--batch-wait-ms", str(args.batch_wait_ms)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if "ws://" not in line:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1].split()[0])


def observations(image_size: int, n: int) -> list[dict]:
    from megavla.data_shards.miniworld import MiniWorld
    out = []
    for i in range(n):
        world = MiniWorld(i % 4, i % 12, "robot/arm", seed=i, image_size=image_size)
        obs = {f"observation/images/{cam}": world.render(cam) for cam in world.cameras}
        out.append({**obs, "observation/state": world.ee_state(), "prompt": world.instruction})
    return out


def run_level(port: int, clients: int, requests: int, obs: list[dict]) -> dict:
    from openpi_client.websocket_client_policy import WebsocketClientPolicy
    conns = [WebsocketClientPolicy("127.0.0.1", port) for _ in range(clients)]
    records: list[list[tuple[float, dict]]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients)

    def loop(i: int) -> None:
        barrier.wait()
        for r in range(requests + 1):  # round 0 is warm-up
            start = time.perf_counter()
            reply = conns[i].infer(obs[(i + r) % len(obs)])
            if r:
                records[i].append(((time.perf_counter() - start) * 1e3, reply["server_timing"]))
    start = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for c in conns:
        c._ws.close()
    flat = [rec for per in records for rec in per]
    rtt = np.array([ms for ms, _ in flat])
    sizes = np.array([t["batch_size"] for _, t in flat])
    infer = np.array([t["infer_ms"] for _, t in flat])
    return {"clients": clients, "requests": len(flat), "batch_mean": sizes.mean(), "batch_max": int(sizes.max()),
            "p50": np.percentile(rtt, 50), "p90": np.percentile(rtt, 90), "p99": np.percentile(rtt, 99),
            "infer_p50": np.percentile(infer, 50), "throughput": (clients * (requests + 1)) / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--image-size", type=int, default=None, help="default: 32 for tiny, else 224")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--requests", type=int, default=30, help="timed requests per client and level")
    p.add_argument("--flow-steps", type=int, default=10)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args()
    import torch
    from megavla.serving.random_export import write_random_export
    size = args.image_size or (32 if args.preset == "tiny" else 224)
    with tempfile.TemporaryDirectory() as tmp:
        export = write_random_export(Path(tmp) / "export", [f"model.preset={args.preset}", f"data.image_size={size}"])
        proc, port = start_server(export, args)
        try:
            obs = observations(size, 8)
            rows = [run_level(port, c, args.requests, obs) for c in args.clients]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else \
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"
    print(f"Device: **{device}**, preset {args.preset}, image {size} px x 3 cameras, {args.flow_steps} flow "
          f"steps, {args.dtype}, --batch-wait-ms {args.batch_wait_ms:g}, torch {torch.__version__}\n")
    print("| clients | timed requests | batch size mean (max) | round trip p50 ms | p90 ms | p99 ms | "
          "server inference p50 ms | requests/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['batch_mean']:.2f} ({r['batch_max']}) | {r['p50']:.1f} | "
              f"{r['p90']:.1f} | {r['p99']:.1f} | {r['infer_p50']:.1f} | {r['throughput']:.1f} |")


if __name__ == "__main__":
    main()
