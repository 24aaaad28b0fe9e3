"""The training loop: micro-batches -> DeepSpeed engine, metrics, periodic/preemption checkpoints.

Signals: SIGTERM and SIGUSR2 (SLURM's warning before preemption/time-out, `--signal=USR2@120`;
USR1 is NCCL's) only set a flag. At every step boundary the flag is all-reduced (MAX), so every
rank sees it at the same step, saves the same checkpoint and exits with EXIT_SIGNAL_SAVED.
"""
from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as tdist

from megavla.config import Config, to_dict
from megavla.data.augment import ImageAugmentation

from . import checkpoint as ckpt
from .engine import DistInfo, lr_factor
from .metrics import MetricsLogger, peak_flops, peak_memory_mb

log = logging.getLogger(__name__)

EXIT_OK = 0
# Exit code after a SIGTERM/SIGUSR2 triggered checkpoint (sysexits EX_TEMPFAIL: "try again later").
# Launchers treat it as "requeue and resume with --resume auto", not as a failure.
EXIT_SIGNAL_SAVED = 75
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class StopFlag:
    """Set by a signal handler; agreed across ranks at step boundaries."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in HANDLED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1 if self.signum is not None else 0], device=device)
        if tdist.is_initialized() and tdist.get_world_size() > 1:
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return bool(flag.item())


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
                 code_version: str = "unknown"):
        self.cfg, self.tcfg = cfg, cfg.train
        self.engine, self.scheduler, self.loader, self.dist = engine, scheduler, loader, dist
        self.run_dir, self.ckpt_dir = run_dir, run_dir / "checkpoints"
        self.step = start_step
        self.flops_per_sample, self.tokens_per_image = flops_per_sample, tokens_per_image
        self.val_loader_factory = val_loader_factory
        self.ema, self.extra_paths, self.code_version = ema, extra_paths or {}, code_version
        self.accum = engine.gradient_accumulation_steps()
        # training batches only (validate() and evaluation see the images as recorded)
        self.augment = ImageAugmentation(cfg.data.cameras) if cfg.data.augment_images else None
        self.stop = StopFlag()
        self.peak = peak_flops(dist.device)
        self.losses: list[tuple[int, float]] = []   # (step, total loss averaged over ranks) for callers
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
            if self.augment is not None:  # on the device, from the global RNG the checkpoint saves
                batch = self.augment(batch)
            t1 = time.perf_counter()
            out = self.engine(batch)
            self.engine.backward(out["loss"])
            self._sync()
            t2 = time.perf_counter()
            self.engine.step()     # optimizer step only at the accumulation boundary
            self._sync()
            t3 = time.perf_counter()
            data_wait, fwd_bwd, opt = data_wait + t1 - t0, fwd_bwd + t2 - t1, opt + t3 - t2
            samples += batch.batch_size
            tokens += batch_tokens(batch, self.tokens_per_image)
            for k, v in out.items():
                key = "loss/total" if k == "loss" else (k if "/" in k else f"loss/{k}")
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

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self, reason: str) -> Path:
        t0 = time.perf_counter()
        loader_state = self.loader.state_dict() if hasattr(self.loader, "state_dict") else None
        trainer_state = {
            "step": self.step, "world_size": self.dist.world_size, "reason": reason,
            "zero_stage": self.tcfg.zero_stage, "precision": self.tcfg.precision,
            "config": to_dict(self.cfg), "code_version": self.code_version, "time": time.time(),
        }
        rank_state = {"rank": self.dist.rank, "world_size": self.dist.world_size,
                      "rng": ckpt.rng_state(), "loader": loader_state}
        path = ckpt.save_checkpoint(
            self.engine, self.ckpt_dir, self.step, rank=self.dist.rank, trainer_state=trainer_state,
            rank_state=rank_state, ema_state=self.ema.shadow if self.ema else None,
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
            metrics.add({("loss/total" if k == "loss" else (k if "/" in k else f"loss/{k}")): scalar(v)
                         for k, v in out.items()})
        metrics.write(self.step, metrics.reduce(), prefix="val/")
        self.engine.train()

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self) -> int:
        t = self.tcfg
        stop_at = t.steps if not t.max_steps_per_run else min(t.steps, self.step + t.max_steps_per_run)
        metrics = MetricsLogger(self.run_dir, self.dist.rank, self.dist.device, total_steps=t.steps,
                                start_step=self.step, tensorboard=t.tensorboard, progress=t.progress)
        self.stop.install()
        code = EXIT_OK
        first_step = self.step
        try:
            while self.step < stop_at:
                metrics.add(self.train_step())
                metrics.advance()
                if self.step % t.log_every == 0 or self.step == stop_at:
                    reduced = metrics.reduce()
                    skips = getattr(self.loader, "skip_counts", None)
                    if callable(skips):
                        skips = skips()
                    for k, v in (skips or {}).items():
                        reduced[f"data/skipped_{k}"] = float(v)
                    metrics.write(self.step, reduced)
                    self.losses.append((self.step, reduced.get("loss/total", float("nan"))))
                    if self.dist.rank == 0 and not t.progress:
                        log.info("step %d loss %.4f", self.step, reduced.get("loss/total", float("nan")))
                if t.val_every and self.step % t.val_every == 0:
                    self.validate(metrics)
                if self.stop.agreed(self.dist.device):
                    name = signal.Signals(self.stop.signum).name if self.stop.signum else "a peer's signal"
                    log.warning("rank %d: stopping at step %d after %s", self.dist.rank, self.step, name)
                    self.save(reason="signal")
                    code = EXIT_SIGNAL_SAVED
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
