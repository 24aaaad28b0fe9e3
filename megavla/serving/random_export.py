"""A randomly initialised but complete export (what ``megavla export`` writes), for tests and benchmarks.

``write_random_export(DIR)`` -> DIR/model.safetensors + model_config.yaml + config.yaml +
norm_stats.json (robot/arm, plausible ranges) + tokenizers/ (text trained on the mini-world's
instructions and subtasks, FAST on random smooth chunks). The weights are untrained: the actions mean
nothing, but every stage a real export goes through (loading, schema, batching, normalization,
tokenization) runs for real.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from megavla.config import Config, load_config, write_yaml

# Per-dim ranges of the mini-world robot: state (10 = xyz in metres, 6D rotation, gripper) and
# actions per step (7 = xyz, axis-angle, gripper).
_STATE = {"q01": [0.2, -0.2, 0.05, -1, -1, -1, -1, -1, -1, 0.0], "q99": [0.7, 0.3, 0.3, 1, 1, 1, 1, 1, 1, 1.0]}
_ACTIONS = {"q01": [-0.02, -0.02, -0.02, -0.1, -0.1, -0.1, 0.0], "q99": [0.02, 0.02, 0.02, 0.1, 0.1, 0.1, 1.0]}


def _stats(q: dict) -> dict:
    lo, hi = np.array(q["q01"]), np.array(q["q99"])
    return {"mean": ((lo + hi) / 2).tolist(), "std": ((hi - lo) / 4).tolist(), "q01": lo.tolist(), "q99": hi.tolist()}


def write_random_export(out: str | Path, overrides: list[str] | tuple[str, ...] = (), seed: int = 0,
                        text_vocab: int = 400, fast_vocab: int = 256) -> Path:
    """Config from ``model.preset=tiny data.image_size=32`` plus ``overrides``; returns ``out``."""
    from megavla.data_shards.miniworld import NUM_TASKS, task_spec
    from megavla.model.io import save_model
    from megavla.model.vla import build_model
    from megavla.tokenizers.fast import train_fast_tokenizer
    from megavla.tokenizers.text import train_text_tokenizer

    out = Path(out)
    cfg: Config = load_config(None, ["model.preset=tiny", "data.image_size=32", *overrides])
    torch.manual_seed(seed)
    model = build_model(cfg.model).eval()
    save_model(model, out)
    write_yaml(cfg, out / "config.yaml")
    stats = {"robot/arm": {"state": _stats(_STATE), "actions": _stats(_ACTIONS), "num_steps": 1000}}
    (out / "norm_stats.json").write_text(json.dumps(stats))
    texts = []
    for scene in range(4):
        for task in range(NUM_TASKS):
            spec = task_spec(scene, task)
            texts += [spec.instruction, *spec.subtasks]
    tok_dir = out / "tokenizers"
    tok_dir.mkdir(exist_ok=True)
    train_text_tokenizer(texts, tok_dir / "text.model", vocab_size=text_vocab)
    rng = np.random.default_rng(seed)
    chunks = [np.cumsum(rng.normal(0, 0.05, (cfg.data.chunk_length, 7)), axis=0).clip(-1, 1) for _ in range(64)]
    train_fast_tokenizer(chunks, vocab_size=fast_vocab, out_path=tok_dir / "fast")
    return out
