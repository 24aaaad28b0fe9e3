"""The training loop: micro-batches -> DeepSpeed engine, metrics, periodic/signal checkpoints.

Signals only set a flag; at every step boundary the flags are all-reduced (MAX, together with the
non-finite-loss flag: one collective per step), so every rank acts at the same step:
- SIGUSR2 (SLURM's warning before preemption / time-out, `--signal=USR2@120`; USR1 is NCCL's):
  a preemption: save and exit EXIT_SIGNAL_SAVED (75); the launcher requeues.
- SIGTERM or SIGINT without any USR2: a stop (scancel, Ctrl-C, kill): save and exit 128 + signal;
  nobody requeues. A second SIGINT aborts at once without saving.
Non-finite steps: DeepSpeed (ZeRO 1-3) skips an update whose global gradient norm is inf/NaN (the
norm is reduced over ranks, so they agree) and counts it in `engine.skipped_steps`; ZeRO-0 is
checked here. Such steps are counted (`train/skipped_nonfinite`) and max_nonfinite_steps in a row
stop the run with NonFiniteError; weights are checked finite before every save.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as tdist

from megavla.config import Config, to_dict

from . import checkpoint as ckpt
from .engine import DistInfo, lr_factor
from .errors import NonFiniteError
from .metrics import MetricsLogger, peak_flops, peak_memory_mb

log = logging.getLogger(__name__)

EXIT_OK = 0
# Exit code after a SIGUSR2 (preemption) checkpoint (sysexits EX_TEMPFAIL: "try again later").
# Launchers treat it as "requeue and resume with --resume auto", not as a failure.
EXIT_SIGNAL_SAVED = 75
# After a SIGTERM / SIGINT stop with a checkpoint saved: 128 + signal, the shell's convention.
EXIT_STOPPED = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


class StopFlag:
    """Set by signal handlers; agreed across ranks at step boundaries."""

    def __init__(self) -> None:
        self.signum: int | None = None      # the first signal
        self.preempt = False                # a USR2 arrived (possibly after a TERM)
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in HANDLED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            os.write(2, b"second interrupt: aborting without a checkpoint\n")
            os._exit(128 + signal.SIGINT)
        if signum == signal.SIGUSR2:
            self.preempt = True
        if self.signum is None:
            self.signum = signum
            what = "preemption warning: checkpoint and requeue" if signum == signal.SIGUSR2 else \
                "stop: saving a checkpoint at the end of this step" + \
                (" (Ctrl-C again to abort)" if signum == signal.SIGINT else "")
            os.write(2, f"{signal.Signals(signum).name} ({what})\n".encode())

    def agreed(self, device: torch.device, nonfinite: bool = False) -> tuple[bool, bool, bool]:
        """(stop, preempt, nonfinite), each True on every rank if True on any: one all-reduce."""
        flags = torch.tensor([self.signum is not None, self.preempt, nonfinite], dtype=torch.int32, device=device)
        if tdist.is_initialized() and tdist.get_world_size() > 1:
            tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
        stop, preempt, bad = (bool(x) for x in flags.tolist())
        return stop, preempt, bad


def metric_key(name: str) -> str:
    """The model's output names -> metric keys ("loss" -> "loss/total", "flow" -> "loss/flow")."""
    return "loss/total" if name == "loss" else (name if "/" in name else f"loss/{name}")


def scalar(v) -> float:
    return float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)


def batch_tokens(batch, tokens_per_image: int) -> int:
    """Valid tokens the model attends over for this batch (text, FAST, subtask, images, actions)."""
    n = int(batch.text_mask.sum() + batch.fast_mask.sum() + batch.subtask_mask.sum())
    n += int(batch.action_time_mask.sum())
    return n + int(batch.image_mask.sum()) * tokens_per_image


class EMA:
    """fp32 exponential moving average of the trainable parameters (ZeRO stage <= 2 only)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for n, p in module.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)


class Trainer:
    def __init__(self, cfg: Config, engine, scheduler, loader, dist: DistInfo, run_dir: Path, *,
                 start_step: int = 0, flops_per_sample: float | None = None, tokens_per_image: int = 0,
                 val_loader_factory: Callable[[], Iterable] | None = None,
                 ema: EMA | None = None, extra_paths: dict[str, Path] | None = None,
                 code_version: str = "unknown", batch: dict | None = None, skipped_nonfinite: int = 0,
                 events: list[dict] | None = None):
        self.cfg, self.tcfg = cfg, cfg.train
        self.engine, self.scheduler, self.loader, self.dist = engine, scheduler, loader, dist
        self.run_dir, self.ckpt_dir = run_dir, run_dir / "checkpoints"
        self.step = start_step
        self.flops_per_sample, self.tokens_per_image = flops_per_sample, tokens_per_image
        self.val_loader_factory = val_loader_factory
        self.ema, self.extra_paths, self.code_version = ema, extra_paths or {}, code_version
        self.accum = engine.gradient_accumulation_steps()
        self.batch = batch or {}
        self.events = events or []            # written to metrics.jsonl before the first step
        self.stop = StopFlag()
        self.peak = peak_flops(dist.device)
        self.skipped_nonfinite = skipped_nonfinite   # over the whole run (kept in trainer_state.json)
        self.nonfinite_in_a_row = 0
        self._iter = iter(loader)

    # ---- one optimizer step ----------------------------------------------------------------
    def _sync(self) -> None:
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)

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

    def train_step(self) -> dict[str, float]:
        self.engine.train()
        t_step = time.perf_counter()
        data_wait = fwd_bwd = opt = 0.0
        samples = tokens = 0
        sums: dict[str, float] = {}
        lr = self.tcfg.lr * lr_factor(self.step, self.tcfg)
        for _ in range(self.accum):
            t0 = time.perf_counter()
            batch = self._next_batch().to(self.dist.device, non_blocking=True)
            t1 = time.perf_counter()
            out = self.engine(batch)
            self.engine.backward(out["loss"])
            self._sync()
            t2 = time.perf_counter()
            if self.tcfg.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
                self._drop_nonfinite_grads()
            self.engine.step()     # optimizer step only at the accumulation boundary
            self.engine.__dict__.pop("gradient_clipping", None)   # undo _drop_nonfinite_grads
            self._sync()
            t3 = time.perf_counter()
            data_wait, fwd_bwd, opt = data_wait + t1 - t0, fwd_bwd + t2 - t1, opt + t3 - t2
            samples += batch.batch_size
            tokens += batch_tokens(batch, self.tokens_per_image)
            for k, v in out.items():
                key = metric_key(k)
                sums[key] = sums.get(key, 0.0) + scalar(v) / self.accum
        if self.ema is not None:
            self.ema.update(self.engine.module)
        self.step += 1
        total = time.perf_counter() - t_step
        world = self.dist.world_size
        metrics = dict(sums)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["optim/grad_norm"] = scalar(grad_norm)
        metrics.update({
            "optim/lr": lr,
            "time/step_s": total, "time/data_wait_s": data_wait, "time/fwd_bwd_s": fwd_bwd,
            "time/optimizer_s": opt, "time/data_wait_pct": 100.0 * data_wait / max(total, 1e-9),
            # Per-rank throughput x world = global (ranks run in lockstep).
            "perf/samples_per_s": samples * world / total, "perf/tokens_per_s": tokens * world / total,
            "memory/peak_mb": peak_memory_mb(self.dist.device),
        })
        if self.peak and self.flops_per_sample:
            metrics["perf/mfu"] = self.flops_per_sample * samples / total / self.peak
        return metrics

    # ---- non-finite steps ---------------------------------------------------------------------
    def _drop_nonfinite_grads(self) -> None:
        """ZeRO-0 has no overflow check in DeepSpeed, so a NaN/inf gradient would reach AdamW. At the
        boundary the gradients are already all-reduced (the same on every rank), so this local check
        agrees; grad=None makes AdamW skip every parameter: no weight or moment update."""
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        if params and not bool(torch.isfinite(torch.stack(torch._foreach_norm([p.grad for p in params]))).all()):
            for p in params:
                p.grad = None
            # DeepSpeed's fp32 clipping indexes the first gradient: no clipping for this empty step.
            self.engine.gradient_clipping = lambda: 0.0
            self._zero0_skipped = True

    def _count_nonfinite(self, step_metrics: dict[str, float]) -> None:
        self.skipped_nonfinite += 1
        self.nonfinite_in_a_row += 1
        loss, norm = step_metrics.get("loss/total", float("nan")), step_metrics.get("optim/grad_norm", float("nan"))
        if self.dist.rank == 0:
            log.warning("step %d: non-finite loss (%.4g) or gradient norm (%.4g): update skipped (%d in a row, "
                        "%d in this run)", self.step, loss, norm, self.nonfinite_in_a_row, self.skipped_nonfinite)
        if self.nonfinite_in_a_row >= self.tcfg.max_nonfinite_steps:
            latest = ckpt.list_checkpoints(self.ckpt_dir)
            raise NonFiniteError(
                f"{self.nonfinite_in_a_row} optimizer steps in a row (up to step {self.step}) had a non-finite "
                f"loss or gradient norm (last loss {loss:.4g}, grad norm {norm:.4g}); stopped without saving "
                f"(newest checkpoint: {latest[-1] if latest else 'none'}). Check the data (`megavla data verify`: "
                f"NaN/inf in norm stats or samples), lower train.lr, or raise train.max_nonfinite_steps")

    def _check_finite_weights(self) -> None:
        """Never save non-finite weights (agreed: under ZeRO-3 each rank holds a different part)."""
        tensors = [getattr(p, "ds_tensor", p).detach() for p in self.engine.module.parameters()]
        tensors += list(self.ema.shadow.values()) if self.ema else []
        bad = not all(bool(torch.isfinite(t).all()) for t in tensors if t.numel())
        if ckpt._any_rank(bad, self.dist.device):
            raise NonFiniteError(f"the weights at step {self.step} are not finite; not saving them (the newest "
                                 f"checkpoint in {self.ckpt_dir} stays the resume point)")

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self, reason: str) -> Path:
        t0 = time.perf_counter()
        self._check_finite_weights()
        loader_state = self.loader.state_dict() if hasattr(self.loader, "state_dict") else None
        trainer_state = {
            "format": 1, "step": self.step, "world_size": self.dist.world_size, "reason": reason,
            "zero_stage": self.tcfg.zero_stage, "precision": self.tcfg.precision, "batch": self.batch,
            "skipped_nonfinite": self.skipped_nonfinite,
            "config": to_dict(self.cfg), "code_version": self.code_version, "time": time.time(),
        }
        rank_state = {"rank": self.dist.rank, "world_size": self.dist.world_size,
                      "rng": ckpt.rng_state(), "loader": loader_state}
        path = ckpt.save_checkpoint(
            self.engine, self.ckpt_dir, self.step, rank=self.dist.rank, device=self.dist.device,
            trainer_state=trainer_state, rank_state=rank_state, ema_state=self.ema.shadow if self.ema else None,
            extra_paths=self.extra_paths, keep_last=self.tcfg.keep_last)
        if self.dist.rank == 0:
            log.info("saved checkpoint %s (%s, %.2f s)", path, reason, time.perf_counter() - t0)
        return path

    # ---- validation ---------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, metrics: MetricsLogger) -> None:
        if self.val_loader_factory is None:
            return
        self.engine.eval()
        for i, batch in enumerate(self.val_loader_factory()):
            if i >= self.tcfg.val_batches:
                break
            out = self.engine(batch.to(self.dist.device))
            metrics.add({metric_key(k): scalar(v) for k, v in out.items()})
        metrics.write(self.step, metrics.reduce(), prefix="val/")
        self.engine.train()

    # ---- the loop ---------------------------------------------------------------------------
    def _one_step(self, metrics: MetricsLogger) -> tuple[bool, bool]:
        """Train one optimizer step; returns the agreed (stop, preempt) flags."""
        skipped_before = self.engine.skipped_steps
        self._zero0_skipped = False
        step_metrics = self.train_step()
        ds_skipped = self.engine.skipped_steps > skipped_before
        if ds_skipped:
            self.scheduler.step()    # DeepSpeed does not step the schedule on a skipped update; the lr
            #                          stays a function of the step (as a resume assumes)
        stop, preempt, bad_loss = self.stop.agreed(
            self.dist.device, nonfinite=not math.isfinite(step_metrics.get("loss/total", 0.0)))
        if ds_skipped or self._zero0_skipped or bad_loss:
            self._count_nonfinite(step_metrics)
        else:
            self.nonfinite_in_a_row = 0
            metrics.add(step_metrics)
        metrics.advance()
        return stop, preempt

    def _log(self, metrics: MetricsLogger) -> None:
        reduced = metrics.reduce()
        skips = getattr(self.loader, "skip_counts", None)
        for k, v in (skips() if callable(skips) else {}).items():
            reduced[f"data/skipped_{k}"] = float(v)
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
        # submitit's preemption sends TERM then USR2 at once: a USR2 that arrived during the save
        # still makes this a preemption.
        _, preempt, _ = self.stop.agreed(self.dist.device)
        if preempt:
            return EXIT_SIGNAL_SAVED
        interrupted = torch.tensor([int(self.stop.signum == signal.SIGINT)], device=self.dist.device)
        if tdist.is_initialized() and tdist.get_world_size() > 1:
            tdist.all_reduce(interrupted, op=tdist.ReduceOp.MAX)
        return EXIT_STOPPED[signal.SIGINT if interrupted.item() else signal.SIGTERM]

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
            while self.step < stop_at:
                stop, preempt = self._one_step(metrics)
                if self.step % t.log_every == 0 or self.step == stop_at:
                    self._log(metrics)
                if t.val_every and self.step % t.val_every == 0:
                    self.validate(metrics)
                if stop:
                    code = self._stop_code(preempt)
                    break
                if t.save_every and self.step % t.save_every == 0 and self.step < stop_at:
                    self.save(reason="periodic")
            else:
                if self.step > first_step:      # nothing new to save when resumed at the end
                    self.save(reason="end" if self.step >= t.steps else "segment")
        finally:
            self.stop.uninstall()
            metrics.close()
        return code
