"""Offline evaluation on held-out episodes: action error and subtask accuracy, with the failure
breakdown of the paper's objective ablation (wrong subtask vs. wrong motion).

Held-out episodes come from the same generator as the training shards
(``data_shards.synth.generate_episode``) with a generator seed that no training set uses
(:data:`HELDOUT_SEED`), so they are new draws of the target combos.

Per evaluated (episode, timestep):

* ``action_mse``: mean squared error of ``sample_actions`` (fixed noise) against the recorded chunk,
  in normalized units, over the supervised dims and valid chunk steps (the training loss's mask).
* ``subtask_correct``: the greedy ``predict_subtask`` text equals the annotation active at t.
* breakdown: ``wrong_subtask`` (subtask wrong), ``wrong_motion`` (subtask right, action_mse above
  ``motion_threshold``), ``ok``. Without a text tokenizer or with ``subtask=False`` every step is
  judged on motion alone.
"""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import torch
from tqdm import tqdm

from megavla.data.collate import active_subtask
from megavla.data_shards.format import Episode
from megavla.data_shards.synth import generate_episode

from .closed_loop import parse_combo
from .policy import LoadedCheckpoint, episode_batch

log = logging.getLogger(__name__)

HELDOUT_SEED = 424242
DEFAULT_MOTION_THRESHOLD = 0.1


def heldout_episodes(combos: list[str], episodes_per_combo: int, *, image_size: int,
                     embodiment: str = "robot/arm", cameras=("head", "left_wrist", "right_wrist"),
                     seed: int = HELDOUT_SEED) -> list[Episode]:
    return [generate_episode(embodiment, *parse_combo(c), e, image_size=image_size, cameras=tuple(cameras),
                             seed=seed)
            for c in combos for e in range(episodes_per_combo)]


def timesteps(ep: Episode, count: int) -> list[int]:
    """``count`` evenly spaced valid timesteps (deterministic, covers every phase of the episode)."""
    valid = np.flatnonzero(ep.step_valid)
    idx = np.linspace(0, len(valid) - 1, num=min(count, len(valid))).round().astype(int)
    return sorted({int(valid[i]) for i in idx})


@torch.no_grad()
def evaluate_offline(loaded: LoadedCheckpoint, episodes: list[Episode], steps_per_episode: int = 8,
                     num_flow_steps: int = 10, subtask: bool = True,
                     motion_threshold: float = DEFAULT_MOTION_THRESHOLD, seed: int = 0,
                     progress: bool = True) -> dict:
    """Action error / subtask accuracy / failure breakdown over ``episodes`` (JSON-ready dict)."""
    if not episodes:
        raise ValueError("no held-out episodes to evaluate")
    model, tok = loaded.model, loaded.text_tokenizer
    do_subtask = subtask and tok is not None
    gen = torch.Generator().manual_seed(seed)
    mses: list[float] = []
    correct: list[bool] = []
    verdicts: Counter = Counter()
    per_combo: dict[str, list[float]] = {}
    for ep in tqdm(episodes, desc="offline", unit="ep", disable=not progress):
        ts = timesteps(ep, steps_per_episode)
        batch = episode_batch(loaded, [(ep, t) for t in ts])
        noise = torch.randn(batch.actions.shape, generator=gen)
        pred = model.sample_actions(batch, num_steps=num_flow_steps, noise=noise).float()
        mask = (batch.action_dim_mask[:, None, :] & batch.action_time_mask[:, :, None]).float()
        per_sample = ((pred - batch.actions) ** 2 * mask).sum((1, 2)) / mask.sum((1, 2)).clamp_min(1.0)
        ep_mse = per_sample.tolist()
        mses += ep_mse
        per_combo.setdefault(ep.combo, []).extend(ep_mse)
        if do_subtask:
            ids, valid = model.predict_subtask(batch, max_len=16, eos_id=tok.eos_id)
            texts = [tok.decode([int(i) for i, v in zip(row, m) if v]) for row, m in zip(ids, valid)]
            hits = [text.strip() == active_subtask(ep, t).strip() for text, t in zip(texts, ts)]
        else:
            hits = [True] * len(ts)
        correct += hits if do_subtask else []
        for hit, mse in zip(hits, ep_mse):
            verdicts["wrong_subtask" if not hit else "wrong_motion" if mse > motion_threshold else "ok"] += 1
    n = len(mses)
    return {
        "action_mse": float(np.mean(mses)), "action_mse_std": float(np.std(mses)), "samples": n,
        "episodes": len(episodes),
        "subtask_accuracy": float(np.mean(correct)) if correct else None,
        "breakdown": {k: verdicts.get(k, 0) / n for k in ("ok", "wrong_subtask", "wrong_motion")},
        "breakdown_counts": {k: verdicts.get(k, 0) for k in ("ok", "wrong_subtask", "wrong_motion")},
        "motion_threshold": motion_threshold,
        "per_combo_action_mse": {c: float(np.mean(v)) for c, v in per_combo.items()},
    }
