"""The training loop: micro-batches -> DeepSpeed engine, metrics, validation, periodic and
signal checkpoints.

Where the rest lives: stop and preemption signals in stop.py (the exit codes too), what a checkpoint
restores besides weights and optimizer in train_state.py (TrainState), the optimizer and LR schedule
in optim.py, DeepSpeed patches in deepspeed_patches.py, the checkpoint files in checkpoint.py.

Non-finite steps: DeepSpeed (ZeRO 1-3) skips an update whose global gradient norm is inf/NaN (the
norm is reduced over ranks, so all ranks skip together; a NaN loss gives NaN gradients) and counts
it in `engine.skipped_steps`, a host int: no extra sync. ZeRO-0 has no such check: it is done
here. Skipped steps stay out of the logged means, are counted (`train/skipped_nonfinite`), and
`train.max_nonfinite_steps` in a row stop the run with NonFiniteError; weights are checked finite
before every save.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from megavla.config import Config
from megavla.data.augment import ImageAugmentation

from . import checkpoint as ckpt
from .deepspeed_patches import clipping_off
from .engine import DistInfo
from .errors import NonFiniteError
from .metrics import DeviceSums, LaunchClock, MetricsLogger, peak_flops, peak_memory_mb, sum_over_ranks
from .optim import EMA, lr_factor
from .stop import EXIT_OK, StopFlag, exit_code_after_save
from .train_state import TrainState

log = logging.getLogger(__name__)


def _valid(mask: torch.Tensor) -> int:
    return int(mask.numpy().sum())   # a CPU batch: numpy, so no tensor -> host conversion


def batch_tokens(batch, tokens_per_image: int) -> int:
    """Valid tokens of a CPU batch for models without a FLOP model (text, FAST, subtask, images, actions)."""
    n = _valid(batch.text_mask) + _valid(batch.fast_mask) + _valid(batch.subtask_mask)
    return n + _valid(batch.action_time_mask) + _valid(batch.image_mask) * tokens_per_image


# (tokens, training FLOPs or None) of one CPU micro-batch; entry.run builds it from the model.
BatchAccounting = Callable[[Any], "tuple[int, float | None]"]


def mask_accounting(tokens_per_image: int) -> BatchAccounting:
    """Tokens counted from a batch's masks, no FLOPs: models without a FLOP model (tests' toys)."""
    return lambda batch: (batch_tokens(batch, tokens_per_image), None)


class StepClock:
    """Marks inside a step: host time on CPU (ops run synchronously); CUDA events on a GPU, read only
    when the log interval's metrics are read (host clocks there would time kernel launches, and
    synchronizing to read them would stall the queue every step)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()   # already complete when the metric sums were read first: no wait
        return start.elapsed_time(end) / 1000.0


class Trainer:
    """Runs `cfg.train` on a built engine and loader from `state` (TrainState: step 0 for a fresh
    run, the checkpoint's step for a resume), saving into `cfg.train.run_dir`/checkpoints.
    `events` are written to metrics.jsonl before the first step; `launch` is marked after it."""

    def __init__(self, cfg: Config, engine, loader, dist: DistInfo, state: TrainState, *,
                 batch_accounting: BatchAccounting | None = None,
                 val_loader_factory: Callable[[], Iterable] | None = None, ema: EMA | None = None,
                 events: Iterable[dict] = (), launch: LaunchClock | None = None):
        self.cfg, self.tcfg = cfg, cfg.train
        self.engine, self.loader, self.dist, self.state = engine, loader, dist, state
        self.run_dir = cfg.train.require_run_dir()
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.batch_accounting = batch_accounting or mask_accounting(0)
        self.val_loader_factory, self.ema = val_loader_factory, ema
        self.accum = engine.gradient_accumulation_steps()
        # training batches only (validate() and evaluation see the images as recorded)
        self.augment = ImageAugmentation(cfg.data.cameras) if cfg.data.augment_images else None
        self.events = list(events)
        self.nonfinite_in_a_row = 0
        self.step_skipped = False
        self.stop = StopFlag()
        self.peak = peak_flops(dist.device)
        self.clock = StepClock(dist.device)
        self.last_loss: torch.Tensor | None = None   # detached, on the device: reading it syncs
        self.launch = launch   # marked after the first step, reported in the first metrics record
        self._iter = iter(loader)
        self._launch_metrics: dict[str, float] = {}
        self._new_window(time.perf_counter())

    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    @property
    def skipped_nonfinite(self) -> int:
        return self.state.skipped_nonfinite

    def _new_window(self, now: float) -> None:
        """Per-log-interval accumulators: device sums + host counters and clock marks."""
        self.sums = DeviceSums()
        self.window = {"start": now, "excluded_s": 0.0, "steps": 0, "samples": 0, "tokens": 0, "flops": 0.0,
                       "data_wait_s": 0.0, "marks": [], "lr": 0.0}

    # ---- one optimizer step ----------------------------------------------------------------
    def _next_batch(self):
        # torch's DataLoader draws its base seed from the global RNG when its iterator starts (lazily,
        # at the first next()). A resumed run starts one where the uninterrupted run did not, which
        # would shift every later noise / timestep draw of the model. So data loading never touches
        # the global RNG: the pipeline's randomness is its own (seeded by rank/worker/index).
        with torch.random.fork_rng(devices=[]):
            try:
                return next(self._iter)
            except StopIteration:      # a finite loader: start its next epoch
                self._iter = iter(self.loader)
                return next(self._iter)

    def train_step(self) -> None:
        """One optimizer step. Forces no host sync of its own: losses, grad norm and timings are
        accumulated on the device and read once per log interval (`_read_window`)."""
        w = self.window
        w["lr"] = self.tcfg.lr * lr_factor(self.step, self.tcfg)
        module = getattr(self.engine, "module", self.engine)
        if hasattr(module, "training_step"):  # knowledge insulation may switch on at step N
            module.training_step = self.step
        skipped_before, self._zero0_skipped = self.engine.skipped_steps, False
        outs = []
        for _ in range(self.accum):
            t0 = time.perf_counter()
            host_batch = self._next_batch()
            tokens, flops = self.batch_accounting(host_batch)   # host masks: no device sync
            batch = host_batch.to(self.dist.device, non_blocking=True)
            w["data_wait_s"] += time.perf_counter() - t0
            m1 = self.clock.mark()
            if self.augment is not None:  # on the device, from the global RNG the checkpoint saves
                batch = self.augment(batch)
            out = self.engine(batch)
            self.engine.backward(out["loss"])
            m2 = self.clock.mark()
            dropped = self.tcfg.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary() \
                and self._drop_nonfinite_grads()
            with clipping_off(self.engine) if dropped else contextlib.nullcontext():
                self.engine.step()     # optimizer step only at the accumulation boundary
            w["marks"].append((m1, m2, self.clock.mark()))
            w["samples"] += batch.batch_size
            w["tokens"] += tokens
            w["flops"] = None if flops is None or w["flops"] is None else w["flops"] + flops
            outs.append(out)
            self.last_loss = out["loss"].detach()
        # A host int DeepSpeed already computed (its overflow check): no sync of ours.
        ds_skipped = self.engine.skipped_steps > skipped_before
        self.step_skipped = ds_skipped or self._zero0_skipped
        if ds_skipped:
            self.engine.lr_scheduler.step()   # DeepSpeed does not step the schedule on a skipped update;
            #                                   the lr stays a function of the step (as a resume assumes)
        if self.ema is not None:
            self.ema.update(self.engine.module)
        self.step += 1
        w["steps"] += 1
        if self.step_skipped:        # its NaN / inf losses stay out of the logged means
            return
        for out in outs:
            for k, v in out.items():
                self.sums.add(k, v, 1.0 / self.accum)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            self.sums.add("optim/grad_norm", grad_norm)

    def _mark_first_step(self) -> None:
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)   # once: the first step's true end
        self.launch.mark("first_step")
        self._launch_metrics = self.launch.metrics()
        if self.dist.rank == 0:
            log.info("launch: %s", self.launch.summary())
            if self.tcfg.compile != "none":
                from megavla.model.compile import log_first_step_compile
                log_first_step_compile(self.tcfg.compile)
        self.launch = None

    def _read_window(self) -> dict[str, list[float]]:
        """This rank's {key: [sum, count]} since the last read (the one host sync), then a new window.
        Throughput divides by the whole loop's wall time (data, logging, the stop-flag collective),
        minus checkpoint saves and validation, which are logged on their own."""
        now = time.perf_counter()
        w, steps = self.window, max(1, self.window["steps"])
        pairs = self.sums.read()
        wall = max(now - w["start"] - w["excluded_s"], 1e-9)
        fwd_bwd = sum(self.clock.seconds(a, b) for a, b, _ in w["marks"])
        opt = sum(self.clock.seconds(b, c) for _, b, c in w["marks"])
        world = self.dist.world_size
        per_step = {
            "optim/lr": w["lr"], "time/step_s": wall / steps, "time/data_wait_s": w["data_wait_s"] / steps,
            "time/fwd_bwd_s": fwd_bwd / steps, "time/optimizer_s": opt / steps,
            "time/data_wait_pct": 100.0 * w["data_wait_s"] / wall,
            # the loop's time outside data + forward/backward + optimizer (logging, collectives, EMA)
            "time/other_pct": 100.0 * max(0.0, wall - w["data_wait_s"] - fwd_bwd - opt) / wall,
            # Per-rank throughput x world = global (ranks run in lockstep).
            "perf/samples_per_s": w["samples"] * world / wall, "perf/tokens_per_s": w["tokens"] * world / wall,
            "memory/peak_mb": peak_memory_mb(self.dist.device),
        }
        if w["flops"]:
            # FLOPs of the batches actually run (valid tokens; megavla.model.flops), per rank
            per_step["perf/tflops_per_s"] = w["flops"] / wall / 1e12
            if self.peak:
                per_step["perf/mfu"] = w["flops"] / wall / self.peak
        self._new_window(now)
        pairs.update({k: [v, 1.0] for k, v in per_step.items()})
        return pairs

    # ---- non-finite steps ---------------------------------------------------------------------
    def _drop_nonfinite_grads(self) -> bool:
        """ZeRO-0 has no overflow check in DeepSpeed, so a NaN/inf gradient would reach AdamW. At the
        boundary the gradients are already all-reduced (the same on every rank), so this local check
        agrees; grad=None makes AdamW skip every parameter: no weight or moment update. (One host
        read per step, ZeRO-0 only.) True when it dropped them: that step runs without clipping
        (deepspeed_patches.clipping_off)."""
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        if params and not bool(torch.isfinite(torch.stack(torch._foreach_norm([p.grad for p in params]))).all()):
            for p in params:
                p.grad = None
            self._zero0_skipped = True
        return self._zero0_skipped

    def _count_nonfinite(self) -> None:
        self.state.skipped_nonfinite += 1
        self.nonfinite_in_a_row += 1
        loss = float(self.last_loss) if self.last_loss is not None else float("nan")   # rare path: may sync
        if self.dist.rank == 0:
            log.warning("step %d: non-finite loss (%.4g) or gradient norm: update skipped (%d in a row, "
                        "%d in this run)", self.step, loss, self.nonfinite_in_a_row, self.skipped_nonfinite)
        if self.nonfinite_in_a_row >= self.tcfg.max_nonfinite_steps:
            latest = ckpt.list_checkpoints(self.ckpt_dir)
            raise NonFiniteError(
                f"{self.nonfinite_in_a_row} optimizer steps in a row (up to step {self.step}) had a non-finite "
                f"loss or gradient norm (last loss on rank 0: {loss:.4g}); stopped without saving (newest "
                f"checkpoint: {latest[-1] if latest else 'none'}). Check the data (`megavla data verify`: "
                f"NaN/inf in norm stats or samples), lower train.lr, or raise train.max_nonfinite_steps")

    def _check_finite_weights(self) -> None:
        """Never save non-finite weights (agreed: under ZeRO-3 each rank holds a different part)."""
        tensors = [getattr(p, "ds_tensor", p).detach() for p in self.engine.module.parameters()]
        tensors += list(self.ema.shadow.values()) if self.ema else []
        bad = not all(bool(torch.isfinite(t).all()) for t in tensors if t.numel())
        if ckpt.any_rank(bad, self.dist.device):
            raise NonFiniteError(f"the weights at step {self.step} are not finite; not saving them (the newest "
                                 f"checkpoint in {self.ckpt_dir} stays the resume point)")

    # ---- checkpoints --------------------------------------------------------------------------
    def _extra_paths(self) -> dict[str, Path]:
        """Run-dir files every checkpoint carries (inference needs them)."""
        extra = {"norm_stats.json": self.run_dir / "norm_stats.json"}
        if self.tcfg.tokenizer_dir:
            extra["tokenizers"] = Path(self.tcfg.tokenizer_dir)
        return extra

    def save(self, reason: str) -> Path:
        t0 = time.perf_counter()
        self._check_finite_weights()
        self.state.capture_rank(self.loader)
        path = ckpt.save_checkpoint(
            self.engine, self.ckpt_dir, self.step, rank=self.dist.rank, device=self.dist.device,
            trainer_state=self.state.state_dict(reason), rank_state=self.state.rank_state_dict(self.dist.rank),
            ema_state=self.ema.shadow if self.ema else None, extra_paths=self._extra_paths(),
            keep_last=self.tcfg.keep_last)
        if self.dist.rank == 0:
            log.info("saved checkpoint %s (%s, %.2f s)", path, reason, time.perf_counter() - t0)
        return path

    # ---- validation ---------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, metrics: MetricsLogger) -> None:
        if self.val_loader_factory is None:
            return
        t0 = time.perf_counter()
        self.engine.eval()
        sums = DeviceSums()
        for i, batch in enumerate(self.val_loader_factory()):
            if i >= self.tcfg.val_batches:
                break
            batch = batch.to(self.dist.device)
            if i == 0 and self.tcfg.tensorboard and self.tcfg.val_action_figures > 0:
                self._action_chunk_figure(metrics, batch)
            for k, v in self.engine(batch).items():
                sums.add(k, v)
        metrics.add_sums(sums.read())
        metrics.write(self.step, metrics.reduce(), prefix="val/")
        self.engine.train()
        self.window["excluded_s"] += time.perf_counter() - t0

    def _action_chunk_figure(self, metrics: MetricsLogger, batch) -> None:
        """Predicted vs true chunks of the first validation samples as a tensorboard image
        (val_figures.py), sampled and drawn on rank 0 only. Not under ZeRO-3 with several ranks:
        there a forward gathers parameters from every rank, and a sampling loop whose length may
        differ per rank (subtask decoding stops at EOS) could hang them."""
        module = getattr(self.engine, "module", self.engine)
        multi_rank_zero3 = self.tcfg.zero_stage == 3 and self.dist.world_size > 1
        if metrics.writer is None or multi_rank_zero3 or not hasattr(module, "sample_actions"):
            if self.dist.rank == 0 and not getattr(self, "_figure_skip_logged", False) and metrics.writer is not None:
                log.info("validation action-chunk figure off: %s", "ZeRO-3 with several ranks" if multi_rank_zero3
                         else f"{type(module).__name__} has no sample_actions")
                self._figure_skip_logged = True
            return
        from . import val_figures
        pred, sub = val_figures.sample_chunks(module, batch, self.tcfg.val_action_figures)
        image = val_figures.chunk_figure_image(pred, sub, self.step)
        metrics.writer.add_image(val_figures.TAG, image, self.step, dataformats="HWC")

    def _data_counts(self) -> dict[str, float]:
        """data/skipped_<reason> and data/episodes_read, samples_read: summed over ranks (each rank's
        reader counts only its own shards), once per log interval (collective)."""
        skips = getattr(self.loader, "skip_counts", None)
        read = getattr(self.loader, "read_counts", None)
        local = {**{f"data/skipped_{k}": float(v) for k, v in (skips() if callable(skips) else {}).items()},
                 **{f"data/{k}": float(v) for k, v in (read() if callable(read) else {}).items()}}
        return sum_over_ranks(local, self.dist.device)

    # ---- the loop ---------------------------------------------------------------------------
    def _log(self, metrics: MetricsLogger) -> None:
        metrics.add_sums(self._read_window())
        if self._launch_metrics:
            metrics.add(self._launch_metrics)
            self._launch_metrics = {}
        reduced = metrics.reduce()
        reduced.update(self._data_counts())
        reduced["train/skipped_nonfinite"] = float(self.skipped_nonfinite)
        metrics.write(self.step, reduced)
        if self.dist.rank == 0 and not self.tcfg.progress:
            log.info("step %d loss %.4f", self.step, reduced.get("loss/total", float("nan")))

    def _stop_code(self, preempt: bool) -> int:
        """Save at this step boundary; 75 for a preemption, 128 + signal for a stop."""
        name = signal.Signals(self.stop.signum).name if self.stop.signum else "a peer's signal"
        log.warning("rank %d: %s at step %d after %s: saving", self.dist.rank,
                    "preempted" if preempt else "stopping", self.step, name)
        self.save(reason="preempted" if preempt else "stopped")
        return exit_code_after_save(self.stop, preempt, self.dist.device)

    def fit(self) -> int:
        t = self.tcfg
        stop_at = t.steps if not t.max_steps_per_run else min(t.steps, self.step + t.max_steps_per_run)
        metrics = MetricsLogger(self.run_dir, self.dist.rank, self.dist.device, total_steps=t.steps,
                                start_step=self.step, tensorboard=t.tensorboard, progress=t.progress)
        for event in self.events:
            metrics.write_record(event)
        self.stop.install()
        code = EXIT_OK
        first_step = self.step
        try:
            self.engine.train()
            self._new_window(time.perf_counter())
            while self.step < stop_at:
                self.train_step()
                if self.launch is not None:
                    self._mark_first_step()
                if self.step_skipped:
                    self._count_nonfinite()
                else:
                    self.nonfinite_in_a_row = 0
                metrics.advance()
                if self.step % t.log_every == 0 or self.step == stop_at:
                    self._log(metrics)
                if t.val_every and self.step % t.val_every == 0:
                    self.validate(metrics)
                stop, preempt = self.stop.agreed(self.dist.device)
                if stop:
                    code = self._stop_code(preempt)
                    break
                if t.save_every and self.step % t.save_every == 0 and self.step < stop_at:
                    t_save = time.perf_counter()
                    self.save(reason="periodic")
                    self.window["excluded_s"] += time.perf_counter() - t_save
            else:
                if self.step > first_step:      # nothing new to save when resumed at the end
                    self.save(reason="end" if self.step >= t.steps else "segment")
        finally:
            self.stop.uninstall()
            metrics.close()
        return code
