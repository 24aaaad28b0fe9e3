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


# ---- what the trainer writes: the one list docs/metrics.md is generated from -------------------
# (name, when it is written, meaning). <embodiment>, <reason>, <phase> and <loss key> stand for the
# values metric_placeholders() reads from the code; tests/test_train_newcomer.py checks a real run's keys against
# this list and docs/metrics.md against metrics_markdown().
METRIC_CATALOGUE: list[tuple[str, str, str]] = [
    ("loss/total", "every log", "the optimized loss: flow_weight x flow + fast_weight x fast + subtask_weight x subtask"),
    ("loss/flow", "model.flow_weight > 0", "flow-matching loss (MSE of the predicted velocity on supervised action dims)"),
    ("loss/fast", "model.fast_weight > 0", "FAST action-token cross-entropy (per token)"),
    ("loss/subtask", "model.subtask_weight > 0", "subtask-text cross-entropy (per token)"),
    ("flow/<embodiment>", "that embodiment was in the interval's batches", "`loss/flow` of that embodiment's samples"),
    ("fast/<embodiment>", "as `flow/<embodiment>`", "`loss/fast` of that embodiment's tokens"),
    ("subtask/<embodiment>", "as `flow/<embodiment>`", "`loss/subtask` of that embodiment's tokens"),
    ("optim/lr", "every log", "learning rate of the last step"),
    ("optim/grad_norm", "every log", "global gradient norm before clipping"),
    ("time/step_s", "every log", "wall seconds per optimizer step (the whole loop; saves and validation excluded)"),
    ("time/data_wait_s", "every log", "seconds per step waiting for the next batch"),
    ("time/data_wait_pct", "every log", "time/data_wait_s as % of the step"),
    ("time/fwd_bwd_s", "every log", "seconds per step in forward + backward"),
    ("time/optimizer_s", "every log", "seconds per step in the optimizer step"),
    ("time/other_pct", "every log", "% of the step outside data, forward/backward and optimizer (logging, collectives, EMA)"),
    ("perf/samples_per_s", "every log", "samples per second, all ranks together"),
    ("perf/tokens_per_s", "every log", "valid tokens per second, all ranks together"),
    ("perf/tflops_per_s", "the model reports FLOPs", "training TFLOP/s per rank (valid tokens; megavla/model/flops.py)"),
    ("perf/mfu", "CUDA device with a known bf16 peak", "model FLOPs utilization per rank (perf/tflops_per_s / peak)"),
    ("memory/peak_mb", "every log", "peak memory in MiB: CUDA allocated on GPU, the process's peak RSS on CPU"),
    ("data/skipped_<reason>", "the loader counts skips", "what the reader skipped so far for that reason (shards, episodes, samples, images, frames), summed over ranks"),
    ("data/episodes_read", "the streaming loader", "episodes read so far, summed over ranks"),
    ("data/samples_read", "the streaming loader", "samples read so far, summed over ranks"),
    ("train/skipped_nonfinite", "every log", "steps skipped so far because the loss or gradient was inf/NaN"),
    ("launch/<phase>_s", "first log of each invocation", "wall seconds from process start to the end of that start-up phase"),
    ("launch/<phase>_cpu_s", "first log of each invocation", "CPU seconds of this process at the end of that phase"),
    ("val/<loss key>", "train.val_every > 0 and data.val_sources", "the loss keys above (`loss/*`, `<objective>/<embodiment>`) on validation batches"),
    ("val/action_chunks", "each validation, train.val_action_figures > 0 and train.tensorboard (not ZeRO-3 on several ranks)",
     "tensorboard **image**, not a scalar (not in metrics.jsonl): true (solid) vs predicted (dashed) normalized "
     "action chunks of the first validation samples, per supervised dim (megavla/train/val_figures.py)"),
]
LAUNCH_PHASES = ("imports", "process_group", "model", "engine", "loader", "first_step")  # entry.py, trainer.py
LOSS_METRICS = ("loss/total", "loss/flow", "loss/fast", "loss/subtask", "flow/<embodiment>", "fast/<embodiment>",
                "subtask/<embodiment>")
METRIC_EVENTS = [("batch_changed", "a resume changed the batch (micro batch, grad accumulation or world size): "
                  "one line `{step, event, <field>: [before, after]}`")]


def metric_placeholders() -> dict[str, tuple[tuple[str, ...], str]]:
    """placeholder -> (its values, where they come from), read from the code that makes the keys."""
    from megavla.data_shards.format import EMBODIMENT_IDS
    from megavla.data.shard_reader import SKIP_REASONS
    from megavla.model.losses import embodiment_tag
    return {
        "<embodiment>": (tuple(embodiment_tag(i) for i in sorted(EMBODIMENT_IDS.values())),
                         "data_shards/format.py EMBODIMENT_IDS, '/' -> '_'"),
        "<reason>": (tuple(SKIP_REASONS), "megavla/data/shard_reader.py SKIP_REASONS"),
        "<phase>": (LAUNCH_PHASES, "LaunchClock marks in megavla/train/entry.py and trainer.py"),
        "<loss key>": (LOSS_METRICS, "the loss rows above"),
    }


def documented_metric(key: str) -> str | None:
    """The METRIC_CATALOGUE name a logged key is an instance of (None: undocumented)."""
    import re
    if any(key == name for name, _, _ in METRIC_CATALOGUE):
        return key
    if key.startswith("val/"):
        return "val/<loss key>" if documented_metric(key[4:]) in LOSS_METRICS else None
    placeholders = metric_placeholders()
    for name, _, _ in METRIC_CATALOGUE:
        pattern = re.escape(name)
        for ph in ("<embodiment>", "<reason>", "<phase>"):
            pattern = pattern.replace(re.escape(ph), "(?:" + "|".join(map(re.escape, placeholders[ph][0])) + ")")
        if re.fullmatch(pattern, key):
            return name
    return None


def metrics_markdown() -> str:
    """docs/metrics.md, generated (`python -m megavla.train.metrics > docs/metrics.md`)."""
    lines = ["# Training metrics", "",
             "Every scalar the trainer writes to `RUN_DIR/metrics.jsonl` (one JSON line per log: `step` plus these "
             "keys) and to tensorboard (`RUN_DIR/tb`, same names). Values are means over the steps since the "
             "previous log (`train.log_every`) and over ranks; `data/*` and `train/*` are running totals.", "",
             "Generated from `METRIC_CATALOGUE` in megavla/train/metrics.py by "
             "`python -m megavla.train.metrics > docs/metrics.md`; a test fails when a run writes a key that is "
             "not listed here, or when this file differs from the catalogue.", "",
             "| key | written when | meaning |", "|---|---|---|"]
    lines += [f"| `{name}` | {when} | {meaning} |" for name, when, meaning in METRIC_CATALOGUE]
    lines += ["", "Placeholders:", ""]
    lines += [f"- `{ph}`: {', '.join(f'`{v}`' for v in values)} ({source})"
              for ph, (values, source) in metric_placeholders().items()]
    lines += ["", "Non-scalar lines in metrics.jsonl (they have an `event` key; not in tensorboard):", ""]
    lines += [f"- `{event}`: {meaning}" for event, meaning in METRIC_EVENTS]
    return "\n".join(lines) + "\n"


# ---- the closing summary of `megavla train` and `megavla demo` -----------------------------------
class RunSummary:
    def __init__(self, label: str, curve: list[tuple[int, float]], lines: list[str]) -> None:
        self.label, self.curve, self.lines = label, curve, lines
        start, end = self.start_end()
        self.fell = end < start

    @property
    def window(self) -> int:
        """Logs averaged at each end: 3, fewer for a short curve so the two ends never overlap."""
        return max(1, min(3, len(self.curve) // 2))

    def start_end(self) -> tuple[float, float]:
        """Mean of the first and of the last `window` logged values."""
        head, tail = self.curve[:self.window], self.curve[-self.window:]
        return sum(v for _, v in head) / len(head), sum(v for _, v in tail) / len(tail)


def loss_curve(run_dir: Path, key: str = "loss/flow") -> list[tuple[int, float]]:
    """(step, value) of one metric from metrics.jsonl, by step (a resumed step's later line wins)."""
    curve = {}
    for line in (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:      # a line cut short by a killed run: the summary reads the rest
            continue
        if key in rec:
            curve[rec["step"]] = rec[key]
    return sorted(curve.items())


def run_summary(run_dir: Path) -> RunSummary | None:
    """First -> last flow loss (total loss when the flow objective is off), steps, latest
    checkpoint, tensorboard and metrics paths; None when nothing was logged."""
    from .resume import newest_loadable
    if not (run_dir / "metrics.jsonl").is_file():
        return None
    label, curve = "flow loss", loss_curve(run_dir, "loss/flow")
    if not curve:
        label, curve = "total loss", loss_curve(run_dir, "loss/total")
    if not curve:
        return None
    summary = RunSummary(label, curve, [])
    start, end = summary.start_end()
    change = f"{'fell' if summary.fell else 'DID NOT FALL'} by {100 * (start - end) / start:.1f}%" if start else ""
    newest, _ = newest_loadable(run_dir / "checkpoints", verify=False)
    tb = run_dir / "tb"
    summary.lines = [
        f"{label} {start:.4f} (first {summary.window} logs) -> {end:.4f} (last {summary.window}): {change}",
        f"steps:           {curve[-1][0]} (loss logged at {len(curve)} steps, {curve[0][0]} -> {curve[-1][0]})",
        f"checkpoints:     {run_dir / 'checkpoints'}  (latest: {newest.name if newest else 'none'})",
        f"tensorboard:     " + (f"tensorboard --logdir {tb}" if tb.is_dir() else "off (train.tensorboard=false)"),
        f"metrics:         {run_dir / 'metrics.jsonl'}  (names: docs/metrics.md)",
    ]
    return summary


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


if __name__ == "__main__":
    sys.stdout.write(metrics_markdown())
