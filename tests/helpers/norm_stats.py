"""Norm stats written out by hand for the evaluation tests."""
from __future__ import annotations

import numpy as np


def robot_arm_norm_stats(episodes) -> dict:
    """norm_stats.json's robot/arm entry over the valid steps of ``episodes``."""
    out = {}
    for kind in ("state", "actions"):
        x = np.concatenate([getattr(ep, kind)[ep.step_valid] for ep in episodes]).astype(np.float64)
        out[kind] = {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(),
                     "q01": np.quantile(x, 0.01, 0).tolist(), "q99": np.quantile(x, 0.99, 0).tolist()}
    out["num_steps"] = int(sum(ep.step_valid.sum() for ep in episodes))
    return {"robot/arm": out}
