"""Training metrics: accumulate per step, average across ranks at log time, write tensorboard +
metrics.jsonl (rank 0) and a tqdm line.

Per-embodiment losses exist only on ranks whose batch held that embodiment, so ranks may hold
different key sets: they are exchanged as JSON bytes (an all_gather of uint8 tensors; no pickle,
unlike all_gather_object) and averaged weighted by how often each rank saw the key.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
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


def process_start_time() -> float | None:
    """Epoch seconds at which this process started (Linux /proc; None elsewhere)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


class LaunchClock:
    """Wall and CPU time from the process start to each launch phase (imports, process group, model,
    engine, loader, first step): what a start or resume costs before training runs."""

    def __init__(self) -> None:
        self.start = process_start_time() or time.time()
        self.marks: list[tuple[str, float, float]] = []   # (phase, wall since start, CPU since start)

    def mark(self, phase: str) -> None:
        self.marks.append((phase, time.time() - self.start, time.process_time()))

    def metrics(self) -> dict[str, float]:
        out = {}
        for phase, wall, cpu in self.marks:
            out[f"launch/{phase}_s"], out[f"launch/{phase}_cpu_s"] = wall, cpu
        return out

    def summary(self) -> str:
        parts, last = [], 0.0
        for phase, wall, _ in self.marks:
            parts.append(f"{phase} {wall - last:.2f}")
            last = wall
        phase, wall, cpu = self.marks[-1]
        return f"{phase} done {wall:.2f} s after the process started ({cpu:.2f} CPU-s); s per phase: " + \
            ", ".join(parts)


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


def metric_key(name: str) -> str:
    """Model output name -> logged key: "loss" -> "loss/total", "flow" -> "loss/flow", "flow/x" kept."""
    return "loss/total" if name == "loss" else (name if "/" in name else f"loss/{name}")


BY_EMBODIMENT = "/by_embodiment"


class DeviceSums:
    """Metric values summed where they live (device tensors stay on the device) between two reads;
    `read()` copies them to the host in one transfer -- the only host sync per log interval.

    `add(name, value, weight)`: a scalar (tensor or number) -> sum += value * weight, count += weight
    (counts are host numbers). A model output "<name>/by_embodiment" (float [2, E]: per-embodiment sums
    of numerators and denominators) -> "<name>/<tag>" (model.losses.embodiment_tag: flow/robot_arm)
    with sum = numerator, count = denominator."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.numbers: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, name: str, value, weight: float = 1.0) -> None:
        if name.endswith(BY_EMBODIMENT):
            value = value.detach().double()
            held = self.tensors.get(name)
            self.tensors[name] = value if held is None else held + value
        elif isinstance(value, torch.Tensor):
            key = metric_key(name)
            value = value.detach().double() * weight
            held = self.tensors.get(key)
            self.tensors[key] = value if held is None else held + value
            self.counts[key] += weight
        else:
            key = metric_key(name)
            self.numbers[key] += float(value) * weight
            self.counts[key] += weight

    def read(self) -> dict[str, list[float]]:
        """{key: [sum, count]} of everything added since the last read; resets."""
        out = {k: [self.numbers[k], self.counts[k]] for k in self.numbers}
        if self.tensors:
            keys = list(self.tensors)
            flat = torch.cat([self.tensors[k].reshape(-1) for k in keys]).tolist()  # the one host sync
            pos = 0
            for k in keys:
                n = self.tensors[k].numel()
                values, pos = flat[pos:pos + n], pos + n
                if k.endswith(BY_EMBODIMENT):
                    from megavla.model.losses import embodiment_tag
                    prefix, half = k[: -len(BY_EMBODIMENT)], n // 2
                    for emb in range(half):
                        if values[half + emb] > 0:
                            out[f"{prefix}/{embodiment_tag(emb)}"] = [values[emb], values[half + emb]]
                else:
                    out[k] = [values[0], self.counts[k]]
        self.tensors.clear()
        self.numbers.clear()
        self.counts.clear()
        return out


def sum_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Per-key sums over ranks (counters such as data/skipped_bad_shard; ranks may hold other keys)."""
    total: dict[str, float] = defaultdict(float)
    for part in allgather_json(values, device):
        for k, v in part.items():
            total[k] += v
    return dict(sorted(total.items()))


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

    def add_sums(self, pairs: dict[str, list[float]]) -> None:
        """{key: [sum, count]} (DeviceSums.read()): averaged as sum / count over steps and ranks."""
        for k, (total, count) in pairs.items():
            self.sums[k] += total
            self.counts[k] += count

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
