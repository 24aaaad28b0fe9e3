"""A damaged-shard-set workbench (moved from test_data_damaged.py): six robot episodes in two shards
of three, written with an optional ``mutate(samples, eps)`` that damages the raw tar samples, and
both consumers run under a deadline (SIGALRM: a reader that blocks fails the test instead of hanging
the suite): ``run_verify`` (`megavla data verify`) and ``run_reader`` (the streaming reader)."""
from __future__ import annotations

import contextlib
import io
import itertools
import signal
from pathlib import Path

import numpy as np

from helpers.shard_sets import TinyFastTokenizer, TinyTextTokenizer, grid_episodes, write_shard_set
from megavla.config.core import ConfigError
from megavla.config.data import DataConfig
from megavla.data.cli import main as data_cli
from megavla.data.pipeline import DataError, build_loader
from megavla.data_shards.format import episode_to_sample

DEADLINE_S = 60


@contextlib.contextmanager
def deadline(seconds: int = DEADLINE_S):
    """Raise TimeoutError in the main thread after ``seconds`` (interrupts a blocking open())."""
    def expire(signum, frame):
        raise TimeoutError(f"no result within {seconds} s: the reader hangs")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


EPISODES = 6  # scene 0, tasks 0..5, one episode each; two shards of three


def episodes():
    return grid_episodes(1, EPISODES, 1, steps=6)


def write(directory: Path, mutate=None, eps=None) -> Path:
    """A set of EPISODES robot episodes; ``mutate(samples, eps)`` damages raw tar samples."""
    eps = eps if eps is not None else episodes()
    samples = [episode_to_sample(e) for e in eps]
    if mutate is not None:
        mutate(samples, eps)
    return write_shard_set(directory, eps, per_shard=3, samples=samples)


def reader_cfg(d: Path, **kw) -> DataConfig:
    base = dict(sources={"robot": str(d)}, image_size=16, batch_size=4, num_workers=0, chunk_length=3,
                max_action_dim=6, max_state_dim=5, shuffle_buffer=4, samples_per_episode=2)
    base.update(kw)
    return DataConfig(**base)


def run_reader(d: Path, batches: int = 12, **kw):
    """(outcome, keys read, skip counts, message): outcome 'refuse' (error before or while reading),
    'skip:<reasons>' or 'read'."""
    with deadline():
        try:
            loader = build_loader(reader_cfg(d, **kw), TinyTextTokenizer(), TinyFastTokenizer())
            keys = {k for b in itertools.islice(loader, batches) for k in b.meta["key"]}
        except (ConfigError, DataError) as e:
            return "refuse", set(), {}, str(e)
    skips = {k: v for k, v in loader.skip_counts().items() if v}
    return ("skip:" + ",".join(sorted(skips)) if skips else "read"), keys, skips, ""


def run_verify(d: Path) -> tuple[int, str]:
    out = io.StringIO()
    with deadline(), contextlib.redirect_stdout(out):
        code = data_cli(["verify", str(d), "--no-progress", "--workers", "1"])
    return code, out.getvalue()
