"""The text + FAST tokenizer pair: trained on shard sets into one directory, loaded from it.

``train_tokenizers(shard_dirs, out)`` reads every episode of the shard sets (the shards listed in
each set's ``manifest.json``, with its ``norm_stats.json``; a dir may also hold several sets):

* text corpus: each episode's instruction and its subtask texts;
* FAST corpus: the action chunks the pipeline will tokenize, i.e. ``a[t:t+H]`` of the episode's
  *valid* dims (``action_mask``), normalized per embodiment with the shard sets' stats (quantile
  mode maps [q01, q99] to [-1, 1]), for every valid start t (stride K), with steps past the end
  or not ``step_valid`` forward-filled exactly as megavla/data/collate.py does.

It writes ``OUT/text.model``, ``OUT/fast.model``, ``OUT/fast.json`` and ``OUT/tokenizers.json``
(the corpus counts and settings); ``load_tokenizers(OUT)`` reads the pair back. Bad samples are
counted, logged with shard and key, and skipped (``on_bad_sample="fail"`` raises instead).
`megavla tokenizer train` (cli.py) is the command around it.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from megavla.data_shards.format import EpisodeFormatError, sample_to_episode
from megavla.data_shards.manifest import MANIFEST_FILE, find_shard_sets, shard_file_problem
from megavla.data_shards.manifest import shard_paths as manifest_shard_paths
from megavla.data_shards.stats import NORM_STATS_FILE
from megavla.data_shards.tar_reader import TarFormatError, frames_located, group_members, iter_tar_members, map_shard

from .fast import FastTokenizer, train_fast_tokenizer
from .text import TextTokenizer, train_text_tokenizer

log = logging.getLogger(__name__)

TEXT_FILE, FAST_PREFIX, SUMMARY_FILE = "text.model", "fast", "tokenizers.json"


@dataclass
class CorpusCounts:
    episodes: int = 0
    bad_samples: int = 0
    texts: int = 0
    chunks: int = 0
    invalid_starts: int = 0  # steps with step_valid False: the pipeline never samples them
    padded_chunks: int = 0  # chunks with forward-filled steps (episode end, tracker dropout)
    per_embodiment_chunks: dict[str, int] = field(default_factory=dict)
    per_embodiment_dims: dict[str, list[int]] = field(default_factory=dict)  # valid dims seen


def resolve_shard_sets(shard_dirs: Sequence[str | os.PathLike]) -> list[Path]:
    """Complete shard sets (dirs with manifest.json) named by, or found under, each given dir.

    ``megavla data synth --out DIR`` writes DIR/robot and DIR/human: DIR itself is accepted.
    An incomplete set (shards but no manifest: a write died) is an error, never half-read.
    """
    sets: list[Path] = []
    for d in map(Path, shard_dirs):
        complete, incomplete = find_shard_sets(d)
        if incomplete:
            raise ValueError(f"{incomplete[0]}: shard files but no {MANIFEST_FILE}: an unfinished write; "
                             "rerun the writer (or `megavla data synth --overwrite`)")
        if not complete:
            raise FileNotFoundError(f"{d}: no shard set (no {MANIFEST_FILE} in it or below); pass a "
                                    "directory written by `megavla data synth` or a converter")
        sets += complete
    return sets


def _read_norm_stats(shard_sets: Sequence[Path]) -> dict:
    from megavla.data.normalize import load_norm_stats, merge_norm_stats  # torch import: lazy

    return merge_norm_stats([load_norm_stats(d / NORM_STATS_FILE) for d in shard_sets])


def iter_episodes(shard_dirs: Sequence[str | os.PathLike], counts: CorpusCounts,
                  on_bad_sample: str = "skip"):
    """Episodes of all shard sets in a fixed order, walked and grouped by the training reader's own
    tar reader (data_shards/tar_reader.py; JPEG frames located, never read). An unreadable shard is
    counted once and the rest of it skipped (the episode it cut off is dropped, as the loader drops
    it); bad samples counted + logged; ``on_bad_sample="fail"`` raises instead."""
    for url in (url for d in resolve_shard_sets(shard_dirs) for url in manifest_shard_paths(d)):
        problem = shard_file_problem(url)  # a FIFO named like a shard would block open() forever
        if problem and on_bad_sample == "fail":
            raise ValueError(f"{url}: {problem}")
        if problem:
            counts.bad_samples += 1
            log.warning("skipping shard %s: %s", url, problem)
            continue
        samples = _shard_samples(url)
        read = 0
        while True:
            try:
                sample = next(samples, None)
            except (TarFormatError, OSError, ValueError) as e:
                if on_bad_sample == "fail":
                    raise
                counts.bad_samples += 1
                log.warning("skipping unreadable tar data: %s (rest of the shard skipped after %d samples)",
                            e, read)
                break
            if sample is None:
                break
            read += 1
            try:
                ep = sample_to_episode(sample, where=url)
            except EpisodeFormatError as e:
                if on_bad_sample == "fail":
                    raise
                counts.bad_samples += 1
                log.warning("skipping bad sample: %s", e)
                continue
            counts.episodes += 1
            yield ep


def _shard_samples(url: str) -> Iterator[dict]:
    """A shard's samples; the shard is opened at the first ``next`` so that opening errors surface
    there, with the walk's own."""
    yield from group_members(iter_tar_members(map_shard(url), url, frames_located), url)


def episode_chunks(actions: np.ndarray, action_mask: np.ndarray, step_valid: np.ndarray,
                   chunk_length: int, stride: int, counts: CorpusCounts) -> Iterator[np.ndarray]:
    """The chunks the data pipeline tokenizes (megavla/data/collate.py, build_sample), so the BPE
    merges see the same distribution: start t at every valid step (pipeline sampling), steps past
    the episode end or not ``step_valid`` forward-filled from the last valid step, valid dims only.
    ``actions`` are already normalized."""
    T = actions.shape[0]
    valid_dims = actions[:, action_mask]
    steps = np.arange(chunk_length)
    for t in range(0, T, stride):
        if not step_valid[t]:
            counts.invalid_starts += 1
            continue
        idx = np.minimum(t + steps, T - 1)
        time_mask = (t + steps < T) & step_valid[idx]
        if not time_mask.all():
            counts.padded_chunks += 1
        last = np.maximum.accumulate(np.where(time_mask, steps, 0))
        yield valid_dims[idx[last]]


def train_tokenizers(shard_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                     text_vocab: int = 1024, fast_vocab: int = 1024, chunk_length: int = 10,
                     fast_scale: float = 10.0, chunk_stride: int = 1, normalization: str = "quantile",
                     on_bad_sample: str = "skip") -> tuple[TextTokenizer, FastTokenizer]:
    """Train both tokenizers on the shard sets; write them to ``out_dir`` and return them."""
    from megavla.data.normalize import Normalizer

    if chunk_length <= 0 or chunk_stride <= 0:
        raise ValueError(f"chunk_length={chunk_length} and chunk_stride={chunk_stride} must be positive")
    out = Path(out_dir)
    normalizer = Normalizer(_read_norm_stats(resolve_shard_sets(shard_dirs)), mode=normalization)
    counts = CorpusCounts()
    texts: list[str] = []
    chunks: list[np.ndarray] = []
    for ep in tqdm(iter_episodes(shard_dirs, counts, on_bad_sample), desc="reading episodes",
                   unit="ep", disable=None):
        texts.append(ep.instruction)
        texts += [s.text for s in ep.subtasks]
        actions = normalizer.normalize(ep.actions, ep.embodiment, "actions")
        before = len(chunks)
        chunks += episode_chunks(actions, ep.action_mask, ep.step_valid, chunk_length, chunk_stride, counts)
        emb = counts.per_embodiment_chunks
        emb[ep.embodiment] = emb.get(ep.embodiment, 0) + len(chunks) - before
        dims = counts.per_embodiment_dims.setdefault(ep.embodiment, [])
        dims += sorted({c.shape[1] for c in chunks[before:]} - set(dims))
    counts.texts, counts.chunks = len(texts), len(chunks)
    log.info("tokenizer corpus: %s", counts)
    if counts.episodes == 0:
        raise ValueError(f"no readable episodes in {list(map(str, shard_dirs))} "
                         f"({counts.bad_samples} bad samples skipped)")
    if not chunks:
        raise ValueError(f"no action chunks in {counts.episodes} episodes ({counts.invalid_starts} "
                         "invalid steps); check step_valid in the shards")
    text_tok = train_text_tokenizer(texts, out / TEXT_FILE, vocab_size=text_vocab)
    fast_tok = train_fast_tokenizer(chunks, vocab_size=fast_vocab, scale=fast_scale, out_path=out / FAST_PREFIX)
    summary = {"shards": [str(d) for d in shard_dirs], "chunk_length": chunk_length,
               "chunk_stride": chunk_stride, "normalization": normalization, "counts": asdict(counts),
               "text": {"file": TEXT_FILE, "vocab_size": text_tok.vocab_size, "requested": text_vocab},
               "fast": dict(fast_tok.metadata(), files=[f"{FAST_PREFIX}.model", f"{FAST_PREFIX}.json"])}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return text_tok, fast_tok


def load_tokenizers(out_dir: str | os.PathLike) -> tuple[TextTokenizer, FastTokenizer]:
    """The pair written by ``train_tokenizers`` (``OUT/text.model``, ``OUT/fast.{model,json}``)."""
    out = Path(out_dir)
    return TextTokenizer.load(out / TEXT_FILE), FastTokenizer.load(out / FAST_PREFIX)
