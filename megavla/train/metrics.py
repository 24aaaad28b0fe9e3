"""Training metrics: accumulate per step, average across ranks at log time, write tensorboard +
metrics.jsonl (rank 0) and a tqdm line.

Per-embodiment losses exist only on ranks whose batch held that embodiment, so ranks may hold
different key sets: they are exchanged as JSON bytes (an all_gather of uint8 tensors; no pickle,
unlike all_gather_object) and averaged weighted by how often each rank saw the key.
"""
from __future__ import annotations

import json
import logging
import resource
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device, for MFU. Matched by substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux: the process's peak resident set (model, optimizer, activations).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def allgather_json(obj, device: torch.device) -> list:
    """Every rank's JSON-able `obj`, in rank order."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return [obj]
    data = torch.tensor(bytearray(json.dumps(obj).encode()), dtype=torch.uint8, device=device)
    world = tdist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    tdist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64, device=device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    chunks = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    tdist.all_gather(chunks, padded)
    return [json.loads(bytes(c[: int(s.item())].cpu().tolist()).decode()) for c, s in zip(chunks, sizes)]


class MetricsLogger:
    def __init__(self, run_dir: Path, rank: int, device: torch.device, *, total_steps: int, start_step: int,
                 tensorboard: bool = True, progress: bool = True):
        self.rank, self.device = rank, device
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.writer = None
        self.jsonl = None
        self.bar = None
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(run_dir / "metrics.jsonl", "a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)
            if progress:
                from tqdm import tqdm
                self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                                file=sys.stderr, mininterval=1.0)

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] += float(v)
            self.counts[k] += 1

    def reduce(self) -> dict[str, float]:
        """Average of everything added since the last call, over steps and ranks (collective)."""
        local = {k: [self.sums[k], self.counts[k]] for k in self.sums}
        self.sums.clear()
        self.counts.clear()
        total: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for part in allgather_json(local, self.device):
            for k, (s, c) in part.items():
                total[k][0] += s
                total[k][1] += c
        return {k: s / c for k, (s, c) in sorted(total.items()) if c}

    def write(self, step: int, scalars: dict[str, float], prefix: str = "") -> None:
        """Rank 0 only: tensorboard, one JSONL line, tqdm postfix."""
        if self.rank != 0:
            return
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(prefix + k, v, step)
            self.writer.flush()
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **{prefix + k: v for k, v in scalars.items()}}) + "\n")
            self.jsonl.flush()
        if self.bar is not None and not prefix:
            shown = {k.split("/", 1)[-1]: f"{v:.4g}" for k, v in scalars.items()
                     if k in ("loss/total", "loss/flow", "perf/samples_per_s", "time/data_wait_pct")}
            self.bar.set_postfix(shown, refresh=False)

    def write_record(self, record: dict) -> None:
        """Rank 0 only: one non-scalar line in metrics.jsonl (an event such as a changed batch)."""
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
