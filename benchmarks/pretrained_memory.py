"""Host memory per rank while a model is built and PaliGemma weights are loaded into it (`train.pretrained`):
ZeRO-3 (built under deepspeed.zero.Init, each checkpoint tensor gathered, written and re-partitioned in
turn) against a plain build (what ZeRO-0/1/2 ranks hold before the engine shards optimizer states).

    python benchmarks/pretrained_memory.py [--nproc 4 2] [--modes zero3 plain] [--keep DIR]

Writes a random PaliGemma-layout checkpoint first (transformers, the test extra: ~630 MB, 164M
parameters; nothing is downloaded), then for each (mode, ranks) spawns that many CPU ranks (gloo) that
build the `small` preset at the checkpoint's sizes and load it, as `megavla train` does (the host
heap's build phase included: megavla/train/host_memory.py). Per rank it reports the peak anonymous
memory (RssAnon, polled every 2 ms: the process's own memory; the checkpoint's file pages are shared
page cache and show up only in VmHWM) and the parameters it holds.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def write_checkpoint(path: Path) -> int:
    import transformers
    cfg = transformers.PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=384, intermediate_size=1536,
                           num_hidden_layers=6, num_attention_heads=6, image_size=224, patch_size=14,
                           vision_use_head=False),
        text_config=dict(model_type="gemma", hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=1, head_dim=128, vocab_size=32768),
        image_token_index=32767, projection_dim=1024, hidden_size=1024)
    model = transformers.PaliGemmaForConditionalGeneration(cfg)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class AnonPeak:
    """Peak RssAnon of this process, polled on a thread (VmHWM would count the checkpoint's page cache)."""

    def __init__(self):
        self.peak, self.stopped = _status_kb("RssAnon"), False
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self):
        while not self.stopped:
            self.peak = max(self.peak, _status_kb("RssAnon"))
            time.sleep(0.002)


def rank_main(rank: int, world: int, port: int, path: str, mode: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from megavla.config import load_config
    from megavla.model.pretrained import load_paligemma, paligemma_size_overrides
    from megavla.train.engine import build_partitioned, init_distributed, seed_everything, shutdown_distributed
    from megavla.train.entry import default_model_factory
    from megavla.train.host_memory import start_build_phase
    start_build_phase(0)   # as entry.run with the default train.malloc_mmap_threshold_kb
    init_distributed()
    sizes = dict(paligemma_size_overrides(path), text_vocab_size=32000)
    cfg = load_config(None, ["model.preset=small", "model.kernels=torch", "train.precision=fp32",
                             f"train.zero_stage={3 if mode == 'zero3' else 2}"]
                      + [f"model.{k}={v}" for k, v in sizes.items()])
    poll = AnonPeak()
    before = poll.peak
    seed_everything(0)
    start = time.perf_counter()
    model = build_partitioned(default_model_factory, cfg, 1, world) if mode == "zero3" else default_model_factory(cfg)
    built = poll.peak
    load_paligemma(model, path, strict=False)
    poll.stopped = True
    held = sum(int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    Path(f"{out}.{rank}.json").write_text(json.dumps(dict(
        params_m=sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters()) / 1e6,
        held_mb=held * 4 / 2**20, before_mb=before / 1024, built_mb=built / 1024, loaded_mb=poll.peak / 1024,
        hwm_mb=_status_kb("VmHWM") / 1024, seconds=time.perf_counter() - start)))
    shutdown_distributed()   # barrier + destroy: a peer torn down after rank 0 exits aborts (SIGABRT)


def run(path: Path, mode: str, world: int, tmp: Path) -> list[dict]:
    from megavla.train.engine import free_port
    out = tmp / f"{mode}_{world}"
    mp.start_processes(rank_main, args=(world, free_port(), str(path), mode, str(out)), nprocs=world,
                       start_method="spawn")
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(world)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--modes", nargs="+", default=["zero3", "plain"], choices=["zero3", "plain"])
    parser.add_argument("--keep", help="write (or reuse) the checkpoint here instead of a temp dir")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.keep) if args.keep else Path(tmp) / "paligemma"
        if not (path / "config.json").exists():
            print(f"checkpoint: {write_checkpoint(path) / 1e6:.1f}M parameters -> {path}")
        rows = [(mode, world, run(path, mode, world, Path(tmp))) for mode in args.modes for world in args.nproc]

    def per_rank(results, key):
        return " / ".join(f"{r[key]:.0f}" for r in results)
    print(f"\nhost: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; fp32, `small` preset at the "
          "checkpoint's sizes; anonymous memory per rank (MB)\n")
    print("| mode | ranks | params (M) | held per rank | before the build | after the build | after loading "
          "(peak) | VmHWM (incl. the checkpoint's page cache) | build + load (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, world, results in rows:
        label = "ZeRO-3 (zero.Init, gathered per tensor)" if mode == "zero3" else "plain build (ZeRO-0/1/2)"
        print(f"| {label} | {world} | {results[0]['params_m']:.1f} | {results[0]['held_mb']:.0f} | "
              f"{per_rank(results, 'before_mb')} | {per_rank(results, 'built_mb')} | {per_rank(results, 'loaded_mb')} | "
              f"{per_rank(results, 'hwm_mb')} | {max(r['seconds'] for r in results):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
