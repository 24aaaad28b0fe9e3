"""Validation figure for tensorboard: predicted vs true action chunks of the first validation samples.

A loss curve says how far predictions are from the targets on average; this picture says how: per
supervised action dimension, the true normalized chunk (solid) and the one the model samples for the
same observation (dashed, the flow integrated from a fixed noise draw, so figures of different steps
differ only by the weights). Dimensions the sample does not supervise (``action_dim_mask``: a human
sample's gripper, padding) and chunk steps past the episode end (``action_time_mask``) are left out.

Written by ``Trainer.validate`` on validation batches only (the training step is untouched), every
``train.val_every`` steps, as the image ``val/action_chunks`` (METRIC_CATALOGUE); off with
``train.val_action_figures=0`` or ``train.tensorboard=false``, and under ZeRO-3 with several ranks. Cost: one ``sample_actions`` call on
``val_action_figures`` samples (``FLOW_STEPS`` Euler steps) per validation.
"""
from __future__ import annotations

import numpy as np
import torch

TAG = "val/action_chunks"
FLOW_STEPS = 10
NOISE_SEED = 0


def sample_chunks(module, batch, samples: int) -> tuple[np.ndarray, object]:
    """(predicted actions [n, H, A] float32, the n-sample sub-batch) for the first ``samples`` samples
    (rank 0; ZeRO-3 on one rank gathers each parameter in its module's forward, as in training)."""
    n = min(samples, batch.batch_size)
    sub = batch.select(slice(0, n))
    gen = torch.Generator().manual_seed(NOISE_SEED)
    noise = torch.randn(tuple(sub.actions.shape), generator=gen).to(sub.actions.device)
    pred = module.sample_actions(sub, num_steps=FLOW_STEPS, noise=noise)
    return pred.float().cpu().numpy(), sub


def chunk_figure_image(pred: np.ndarray, sub, step: int) -> np.ndarray:
    """uint8 [H, W, 3] picture: one panel per sample, true (solid) vs predicted (dashed) per valid dim."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from megavla.data_shards.format import EMBODIMENT_IDS
    names = {i: name for name, i in EMBODIMENT_IDS.items()}
    true = sub.actions.float().cpu().numpy()
    dims, times = sub.action_dim_mask.cpu().numpy(), sub.action_time_mask.cpu().numpy()
    n = len(pred)
    fig = Figure(figsize=(6.5, 2.6 * n), dpi=80)
    FigureCanvasAgg(fig)
    colors = [f"C{i % 10}" for i in range(true.shape[-1])]
    for i in range(n):
        ax = fig.add_subplot(n, 1, i + 1)
        t = np.flatnonzero(times[i])
        valid = np.flatnonzero(dims[i])
        for d in valid:
            ax.plot(t, true[i, t, d], color=colors[d], lw=1.5)
            ax.plot(t, pred[i, t, d], color=colors[d], lw=1.2, ls="--")
        err = float(np.mean((pred[i][np.ix_(t, valid)] - true[i][np.ix_(t, valid)]) ** 2)) if len(t) and len(valid) else float("nan")
        emb = names.get(int(sub.embodiment[i]), str(int(sub.embodiment[i])))
        where = "".join(f" {k} {sub.meta[k][i]}" for k in ("scene", "task", "timestep") if k in sub.meta)
        ax.set_title(f"step {step}, sample {i}: {emb}{where}, {len(valid)} dims, MSE {err:.3f}", fontsize=8)
        ax.set_xlabel("chunk step", fontsize=7)
        ax.set_ylabel("normalized action", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle("true (solid) vs predicted (dashed) action chunks, one colour per dim", fontsize=8)
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
