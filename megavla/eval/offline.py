"""Offline evaluation on held-out episodes: action error and subtask accuracy, with the failure
breakdown of the paper's objective ablation (wrong subtask vs. wrong motion).

Held-out episodes come from the same generator as the training shards
(``data_shards.synth.generate_episode``) with a generator seed that no training set uses
(:data:`HELDOUT_SEED`), so they are new draws of the target combos.

Per evaluated (episode, timestep):

* ``action_mse``: mean squared error of ``sample_actions`` (fixed noise) against the recorded chunk,
  in normalized units, over the supervised dims and valid chunk steps (the training loss's mask).
* ``subtask_correct``: the greedy ``predict_subtask`` text equals the annotation active at t.
* ``baselines``: the same error for observation-blind predictors on the same targets and mask, so
  a reader can tell whether the policy learned anything that depends on the observation:
  ``zero`` (raw zero action, i.e. hold still, normalized), ``repeat_previous`` (the recorded previous
  action a[t-1] repeated over the chunk; raw zero at t=0), ``mean_action`` (the per-dim mean of the
  evaluated targets themselves: the best constant in hindsight, a floor no blind policy beats) and
  ``mean_action_train`` (the training data's mean action from the checkpoint's norm stats: what a
  model that ignores its input converges to).
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


BASELINES = ("zero", "repeat_previous", "mean_action", "mean_action_train")


def _normalized(loaded: LoadedCheckpoint, raw: torch.Tensor, embodiment: str) -> torch.Tensor:
    return raw if loaded.normalizer is None else loaded.normalizer.normalize(raw, embodiment, "actions")


def blind_predictions(loaded: LoadedCheckpoint, ep: Episode, ts: list[int], shape) -> dict[str, torch.Tensor]:
    """``zero``, ``repeat_previous`` and ``mean_action_train`` chunks [B, H, A] (normalized, padded)
    for the timesteps ``ts`` of ``ep`` (``mean_action`` needs every target first: see evaluate_offline)."""
    B, H, A = shape
    d = ep.actions.shape[1]
    out = {"zero": _normalized(loaded, torch.zeros(shape), ep.embodiment)}
    prev = torch.zeros(B, A)
    for i, t in enumerate(ts):
        if t > 0 and ep.step_valid[t - 1]:
            prev[i, :d] = torch.as_tensor(ep.actions[t - 1], dtype=torch.float32)
    out["repeat_previous"] = _normalized(loaded, prev[:, None, :].expand(B, H, A).clone(), ep.embodiment)
    if loaded.normalizer is not None and ep.embodiment in loaded.normalizer.stats:
        mean = torch.zeros(B, H, A)
        mean[..., :d] = torch.as_tensor(loaded.normalizer.stats[ep.embodiment]["actions"]["mean"][:d],
                                        dtype=torch.float32)
        out["mean_action_train"] = _normalized(loaded, mean, ep.embodiment)
    return out


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE over supervised dims and valid chunk steps (the training loss's mask)."""
    return ((pred - target) ** 2 * mask).sum((1, 2)) / mask.sum((1, 2)).clamp_min(1.0)


@torch.no_grad()
def evaluate_offline(loaded: LoadedCheckpoint, episodes: list[Episode], steps_per_episode: int = 8,
                     num_flow_steps: int = 10, subtask: bool = True,
                     motion_threshold: float = DEFAULT_MOTION_THRESHOLD, seed: int = 0,
                     progress: bool = True, noise_scale: float = 1.0) -> dict:
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
    blind: dict[str, list[float]] = {}
    targets: list[tuple[torch.Tensor, torch.Tensor]] = []
    for ep in tqdm(episodes, desc="offline", unit="ep", disable=not progress):
        ts = timesteps(ep, steps_per_episode)
        batch = episode_batch(loaded, [(ep, t) for t in ts])
        noise = torch.randn(batch.actions.shape, generator=gen) * noise_scale
        pred = model.sample_actions(batch, num_steps=num_flow_steps, noise=noise).float()
        mask = (batch.action_dim_mask[:, None, :] & batch.action_time_mask[:, :, None]).float()
        ep_mse = masked_mse(pred, batch.actions, mask).tolist()
        for name, chunk in blind_predictions(loaded, ep, ts, tuple(batch.actions.shape)).items():
            blind.setdefault(name, []).extend(masked_mse(chunk, batch.actions, mask).tolist())
        targets.append((batch.actions.float(), mask))
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
    # The best constant in hindsight: per-dim mean of every supervised target value evaluated.
    num = sum((a * m).sum((0, 1)) for a, m in targets)
    den = sum(m.sum((0, 1)) for _, m in targets).clamp_min(1.0)
    blind["mean_action"] = torch.cat([masked_mse((num / den).expand_as(a), a, m) for a, m in targets]).tolist()
    baselines = {name: float(np.mean(blind[name])) for name in BASELINES if name in blind}
    return {
        "action_mse": float(np.mean(mses)), "action_mse_std": float(np.std(mses)), "samples": n,
        "episodes": len(episodes),
        "subtask_accuracy": float(np.mean(correct)) if correct else None,
        "breakdown": {k: verdicts.get(k, 0) / n for k in ("ok", "wrong_subtask", "wrong_motion")},
        "breakdown_counts": {k: verdicts.get(k, 0) for k in ("ok", "wrong_subtask", "wrong_motion")},
        "motion_threshold": motion_threshold,
        "per_combo_action_mse": {c: float(np.mean(v)) for c, v in per_combo.items()},
        "baselines": baselines,
        # < 1: the policy beats the best observation-blind predictor; >= 1: it learned nothing usable.
        "mse_vs_best_baseline": float(np.mean(mses)) / max(min(baselines.values()), 1e-12),
    }
