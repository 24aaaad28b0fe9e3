"""Representation-alignment probe: do human and robot observations of the same task land together?

For each checkpoint, mean-pooled backbone embeddings (``VLA.embed_prefix``) of robot and human
observations of the same scene x task combos (generated fresh by ``data_shards.synth``, a few
timesteps per episode) are scored with the silhouette of the *embodiment* labels (scikit-learn,
cosine distance): near 1 = embodiments form separate clusters, near 0 or below = mixed, i.e. more
aligned. A t-SNE of the same embeddings is drawn coloured by embodiment with one marker per task.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from megavla.data_shards.format import Episode
from megavla.data_shards.stats import NormStatsAccumulator

from .offline import heldout_episodes, timesteps
from .policy import LoadedCheckpoint, episode_batch, load_checkpoint

log = logging.getLogger(__name__)

PROBE_SEED = 515151
EMBODIMENTS = ("robot/arm", "human/ego")


def probe_episodes(combos: list[str], episodes_per_combo: int, image_size: int) -> list[Episode]:
    return [ep for emb in EMBODIMENTS
            for ep in heldout_episodes(combos, episodes_per_combo, image_size=image_size, embodiment=emb,
                                       seed=PROBE_SEED)]


def episodes_norm_stats(episodes: list[Episode]) -> dict:
    """Stats of the probe episodes themselves: used only for embodiments a checkpoint has none for."""
    acc = NormStatsAccumulator()
    for ep in episodes:
        acc.add(ep)
    return acc.finalize()


@torch.no_grad()
def embed(loaded: LoadedCheckpoint, episodes: list[Episode], steps_per_episode: int) -> tuple[np.ndarray, list[dict]]:
    """Embeddings [N, W] and one label dict (embodiment, task, combo, timestep) per row."""
    rows, labels = [], []
    for ep in episodes:
        ts = timesteps(ep, steps_per_episode)
        rows.append(loaded.model.embed_prefix(episode_batch(loaded, [(ep, t) for t in ts])).float().numpy())
        labels += [{"embodiment": ep.embodiment, "task": ep.task, "combo": ep.combo, "timestep": t} for t in ts]
    return np.concatenate(rows), labels


def embodiment_silhouette(embeddings: np.ndarray, labels: list[dict]) -> float:
    from sklearn.metrics import silhouette_score
    y = [lab["embodiment"] for lab in labels]
    if len(set(y)) < 2:
        raise ValueError("the probe needs observations of two embodiments")
    return float(silhouette_score(embeddings, y, metric="cosine"))


def tsne_plot(embeddings: np.ndarray, labels: list[dict], title: str, path: str | Path, seed: int = 0) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    n = len(embeddings)
    xy = TSNE(n_components=2, perplexity=float(min(30, max(2, (n - 1) // 3))), init="pca",
              random_state=seed).fit_transform(embeddings)
    colors = {"robot/arm": "tab:blue", "human/ego": "tab:orange"}
    markers = "os^Dv<>pP*Xh"
    tasks = sorted({lab["task"] for lab in labels})
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for emb in EMBODIMENTS:
        for k, task in enumerate(tasks):
            idx = [i for i, lab in enumerate(labels) if lab["embodiment"] == emb and lab["task"] == task]
            if idx:
                ax.scatter(xy[idx, 0], xy[idx, 1], c=colors[emb], marker=markers[k % len(markers)], s=18,
                           alpha=0.8, label=f"{emb.split('/')[0]} task {task}")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])
    ax.legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_probe(checkpoints: dict[str, str | Path], combos: list[str], out_dir: str | Path, *,
              episodes_per_combo: int = 2, steps_per_episode: int = 6, image_size: int | None = None,
              plot: bool = True) -> dict:
    """{name: checkpoint} -> {name: {"silhouette", "samples", "plot"}}; embeddings saved as
    ``embeddings_<name>.npy`` with one label per row in ``labels_<name>.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    cache: dict[int, tuple[list[Episode], dict]] = {}
    for name, ckpt in checkpoints.items():
        loaded = load_checkpoint(ckpt)
        size = image_size or loaded.cfg.data.image_size
        if size not in cache:
            eps = probe_episodes(combos, episodes_per_combo, size)
            cache[size] = (eps, episodes_norm_stats(eps))
        episodes, stats = cache[size]
        if loaded.normalizer is not None:
            missing = [e for e in EMBODIMENTS if e not in loaded.normalizer.stats]
            if missing:
                log.info("%s: no norm stats for %s; using the probe episodes' own stats", name, missing)
                loaded = load_checkpoint(ckpt, extra_norm_stats={e: stats[e] for e in missing})
        emb, labels = embed(loaded, episodes, steps_per_episode)
        score = embodiment_silhouette(emb, labels)
        safe = name.replace("/", "_")
        np.save(out_dir / f"embeddings_{safe}.npy", emb, allow_pickle=False)
        (out_dir / f"labels_{safe}.json").write_text(json.dumps(labels))
        entry = {"checkpoint": str(loaded.path), "step": loaded.step, "silhouette": score, "samples": len(emb)}
        if plot:
            entry["plot"] = tsne_plot(emb, labels, f"{name}: embodiment silhouette {score:.3f}",
                                      out_dir / f"tsne_{safe}.png").name
        log.info("probe %s: silhouette(embodiment) = %.4f over %d observations", name, score, len(emb))
        results[name] = entry
    return results
