"""Streaming reader: shard sets -> megavla.batch.Batch, resumable bit-exactly.

Usage (the trainer)::

    loader = build_loader(cfg.data, text_tok, fast_tok, rank=rank, world_size=world)
    for batch in loader: ...                      # endless; iter() again continues, never restarts
    state = loader.state_dict()                   # JSON types; save per rank with the checkpoint
    loader.load_state_dict(state)                 # before iterating, on a freshly built loader
    loader.skip_counts()                          # {"bad_sample": n, ...}: data/skipped_<reason>
    loader.read_counts()                          # {"episodes_read": n, "samples_read": n}
    loader.normalizer.unnormalize(actions, embodiment, "actions")   # evaluator

The stream of one (rank, logical worker) is a pure function of (seed, rank, world size, num workers,
worker, index), with no hidden RNG state:

1. Shards. Per source, the manifest's shards that hold at least one kept combo are split by *slot*
   (``rank * W + worker``; ``shards[slot::slots]``; when a source has fewer shards than slots every
   slot reads all of them, logged). A slot reads its shards endlessly, in a fresh permutation per
   epoch (``RNG(seed, source, rank, worker, epoch)``): resampling without repeats inside an epoch.
2. Episodes. shard_reader.py walks the tar headers with data_shards/tar_reader.py (the walk `verify`
   runs too; ~50x faster than ``tarfile``), reads the small
   members and only *locates* the JPEG frames; episodes of excluded combos (combo read from the key)
   have only their ``meta.json`` read and are counted (``excluded_episode``). Each episode passes
   data_shards/validate.py, the checks `megavla data verify` runs too (same code, same messages); a
   set that fails the per-set checks (manifest, shard paths, norm stats, or stats that do not fit its
   first episode) is refused by build_loader before any work. Bad input -- a truncated or corrupt
   tar, a missing shard file or one that is not a regular file (``bad_shard``: the rest of that shard
   is skipped, counted once per epoch by the slot that owns it), a missing member, wrong shape,
   NaN/inf, a value normalized beyond ``data.max_abs_normalized``, no valid step, a tokenizer error
   (``bad_sample``), a key repeated in its shard or held by an earlier shard too (``duplicate_episode``:
   episode_keys.json shows the latter at start, so every rank skips the same later copies), an undecodable frame
   (``bad_image``) -- is logged with shard and key and counted, or raises :class:`DataError` when
   ``data.on_bad_sample = "fail"``. ``skip_counts()`` has the skips by reason, ``read_counts()``
   ``episodes_read`` / ``samples_read``; BatchFields.batch asserts every state/action is finite.
3. Mixture. A deterministic weighted round robin (mixture.py) picks the source of each accepted
   episode; ``samples_per_episode`` timesteps are drawn among the episode's valid steps with
   ``RNG(seed, rank, worker, episode index)``.
4. Shuffle window. Episodes are drawn until the window holds ``shuffle_buffer`` samples; the window is
   permuted with ``RNG(seed, rank, worker, window index)`` and emitted; only then is the next window
   read. Each sample reads and decodes only its frame t of each camera, into the batch buffer
   (collate.py); ``batch_size`` samples make a Batch (built in the worker).
5. torch DataLoader (``batch_size=None``): batch i of a rank comes from logical worker ``i % W``; the
   worker's state after each batch travels with it and is adopted when the batch is consumed.

Restore guarantee (``state_dict`` / ``load_state_dict``): with the same shard sets, data settings,
seed, world size and ``num_workers``, the batches after a restore are bit-identical to those an
uninterrupted reader yields after the same number of consumed batches: no sample is lost, none is
replayed to the trainer, and batches prefetched but not consumed before the save are produced again.
The cost is internal: each worker re-reads the episodes of its current shuffle window (the episodes
behind at most ``shuffle_buffer`` samples, plus tar headers up to the saved offsets) without emitting
them. Skip counters continue from their saved values. A different world size, ``num_workers`` or
stream setting (batch size, chunk length, mixture, combos, shard lists, ...) is refused with
:class:`LoaderStateError`; changed shard *contents* under the same file names are not detected.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megavla.batch import Batch
from megavla.config.core import ConfigError
from megavla.config.data import DataConfig
from megavla.data_shards.format import EpisodeFormatError
from megavla.data_shards.validate import EpisodeValidator, ReadLimits, StatsMismatchError

from .buffers import Arena, BufferMaps, BufferRing, release_when_dropped, worker_message
from .collate import (BatchFields, ImageDecodeError, SampleError, decode_sample_images, encode_fast_chunks,
                      episode_arrays, fast_chunk)
from .loader_state import STATE_VERSION, LoaderStateError, check_compatible, sum_counters
from .mixture import WeightedRoundRobin, select_combos
from .normalize import Normalizer, merge_norm_stats, with_human_gripper_range
from .prompt import check_state_mode
from .shard_reader import (READ_COUNTERS, Counters, DataError, ShardCursor, ShardInfo, read_first_episode,
                           read_manifest)

__all__ = ["DataError", "LoaderStateError", "StreamingLoader", "build_loader"]

log = logging.getLogger(__name__)

# RNG stream tags: SeedSequence([seed, TAG, ...]) keeps the streams independent.
_TAG_SHARD_ORDER, _TAG_TIMESTEPS, _TAG_WINDOW = 1, 2, 3
# Distinct instruction/subtask texts whose token ids a worker keeps (a few KB each at most); past it
# the cache starts over. Real sets have far fewer distinct texts than episodes.
TOKEN_CACHE_LIMIT = 8192
# Steps of episodes whose padded, normalized arrays (collate.episode_arrays) a worker keeps across
# draws, so a set read for many epochs builds them once per episode, not once per epoch (~7 us a
# sample at samples_per_episode 4); ~1 KB a step at 32 state + 32 action dims; past it, start over.
ARRAYS_CACHE_STEPS = 100_000


@dataclass
class Plan:
    """Everything a worker needs, fixed at build time (travels to DataLoader workers by fork/pickle)."""

    cfg: DataConfig
    seed: int
    rank: int
    world_size: int
    num_workers: int
    sources: dict[str, list[ShardInfo]]  # eligible shards per source (hold a kept combo)
    weights: dict[str, float]
    kept_combos: set[str]
    normalizer: Normalizer | None
    validator: EpisodeValidator  # the per-episode checks `megavla data verify` runs
    text_tokenizer: Any = None
    fast_tokenizer: Any = None
    stream_settings: dict[str, Any] = field(default_factory=dict)
    state_mode: str | None = None   # the model's; "text" writes each sample's state into its prompt

    @property
    def slots(self) -> int:
        return self.world_size * max(1, self.num_workers)


class WorkerStream:
    """The batches of one logical worker of one rank, starting from a saved worker state (or fresh)."""

    def __init__(self, plan: Plan, worker: int, state: dict[str, Any] | None = None):
        self.plan, self.worker = plan, worker
        self.counters = Counters(plan.cfg.on_bad_sample)
        self.cursors = {n: self._cursor(n) for n in sorted(plan.weights)}
        self.mixer = WeightedRoundRobin(plan.weights)
        self.window, self.pos, self.episodes = -1, 0, 0
        self.items: list[tuple] = []
        self.token_cache: dict = {}   # token ids by (role, text), shared by all episodes
        self.layout: dict = {}   # the last batch's fields in its buffer's arena (buffers.worker_message)
        self.arrays_cache: dict[str, dict] = {}   # episode (shard path:key) -> its episode_arrays
        self.arrays_cache_steps = 0
        self.window_start: dict[str, Any] = {}
        if state is not None:
            self._restore(state)

    def _cursor(self, name: str) -> ShardCursor:
        plan = self.plan
        slot = plan.rank * max(1, plan.num_workers) + self.worker
        shards = plan.sources[name]
        mine = shards[slot :: plan.slots] if len(shards) >= plan.slots else shards

        counted = {s.path for s in (mine if len(shards) >= plan.slots else shards[slot::plan.slots])}
        order_seed = [plan.seed, _TAG_SHARD_ORDER, sorted(plan.sources).index(name), plan.rank, self.worker]
        return ShardCursor(name, mine, order_seed, plan.kept_combos, plan.validator.check, self.counters,
                           counted_shards=counted)

    def _rng(self, tag: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.plan.seed, tag, self.plan.rank, self.worker, index])

    def _fill_window(self) -> None:
        cfg = self.plan.cfg
        self.window_start = {"sources": {n: c.position() for n, c in self.cursors.items()},
                             "credits": self.mixer.state_dict(), "episodes": self.episodes}
        items: list[tuple] = []
        while len(items) < max(1, cfg.shuffle_buffer):
            name = self.mixer.next()
            ep, where = self.cursors[name].next_episode()
            valid = np.flatnonzero(ep.step_valid)
            rng = self._rng(_TAG_TIMESTEPS, self.episodes)
            steps = rng.choice(valid, size=cfg.samples_per_episode, replace=valid.size < cfg.samples_per_episode)
            self.episodes += 1
            self.counters.add("episodes_read")
            episode_cache = self._episode_cache(where, ep.num_steps)
            items.extend((ep, int(t), name, where, episode_cache) for t in steps)
        order = self._rng(_TAG_WINDOW, self.window).permutation(len(items))
        self.items, self.pos = [items[i] for i in order], 0

    def _episode_cache(self, where: str, steps: int) -> dict:
        """The dict in which episode_arrays keeps the episode's arrays for all its samples, in this and
        later draws (shards are immutable; normalizer, chunk length and dims are fixed per stream)."""
        cache = self.arrays_cache.get(where)
        if cache is None:
            if self.arrays_cache_steps + steps > ARRAYS_CACHE_STEPS:
                self.arrays_cache.clear()
                self.arrays_cache_steps = 0
            cache = self.arrays_cache[where] = {}
            self.arrays_cache_steps += steps
        return cache

    def _restore(self, state: dict[str, Any]) -> None:
        if state["window"] < 0:
            self.counters.load(state["counters"])
            return
        start = state["window_start"]
        self.counters.muted = True  # the replay re-reads what was counted before the save
        for name, cursor in self.cursors.items():
            cursor.seek(start["sources"][name]["draw"], start["sources"][name]["offset"])
        self.mixer.load_state_dict(start["credits"])
        self.episodes, self.window = start["episodes"], state["window"]
        self._fill_window()
        self.pos = state["pos"]
        self.counters.muted = False
        self.counters.load(state["counters"])

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "pos": self.pos, "window_start": self.window_start,
                "counters": dict(self.counters.values)}

    def batches(self, free=None) -> Iterator[tuple[Any, dict[str, Any], int]]:
        """(Batch, worker state, image buffer index); `free`: the queue on which the main process
        returns this worker's buffers (buffers.py), None in the main process."""
        cfg = self.plan.cfg
        shape = (cfg.batch_size, len(cfg.cameras), cfg.image_size, cfg.image_size, 3)
        shared = get_worker_info() is not None
        fields_bytes = BatchFields.arena_bytes(cfg.batch_size, cfg.chunk_length, cfg.max_state_dim,
                                               cfg.max_action_dim, len(cfg.cameras)) if shared else 0
        self.ring = BufferRing(shape, free=free, shared=shared, fields_bytes=fields_bytes)
        while True:
            buffer_index, images = self.ring.take()
            yield self._fill_batch(images, Arena(images) if shared else None), self.state_dict(), buffer_index

    def _next_item(self) -> tuple:
        if self.pos >= len(self.items):
            self.window += 1
            self._fill_window()
        self.pos += 1
        return self.items[self.pos - 1]

    def _fill_batch(self, images: torch.Tensor, arena: Arena | None = None) -> Batch:
        """The next batch_size samples, images decoded into `images`. A sample whose frame, text or
        action chunk is refused is skipped (counted) and the next item takes its place, as if they
        were built one by one; but the work runs in two passes over the missing samples -- all their
        frames, then all their other fields (tokenizers) -- so each pass keeps its own data in the
        caches (one by one, each sample's ~450 KB of decoded frames evicted the tokenizers' tables:
        FAST encoding cost ~2.5x its cost in a loop). Only the order in which two different refused
        samples of one batch are reported can differ (data.on_bad_sample=fail reports the first)."""
        plan, cfg = self.plan, self.plan.cfg
        slots = images.numpy()
        cameras = list(cfg.cameras)
        if len(self.token_cache) > TOKEN_CACHE_LIMIT:
            self.token_cache.clear()
        rows = BatchFields(cfg.batch_size, cfg.chunk_length, cfg.max_state_dim, cfg.max_action_dim, len(cameras),
                           text_tokenizer=plan.text_tokenizer, token_cache=self.token_cache, arena=arena,
                           state_mode=plan.state_mode)
        while rows.n < cfg.batch_size:
            decoded = []   # (item, image mask, slot)
            for _ in range(cfg.batch_size - rows.n):
                ep, t, name, where, cache = item = self._next_item()
                slot = rows.n + len(decoded)
                try:
                    mask = decode_sample_images(ep, t, where=where, cameras=cameras, image_size=cfg.image_size,
                                                out=slots[slot])
                except ImageDecodeError as e:
                    self.counters.bad("bad_image", f"{e} (timestep {t})")
                    continue
                decoded.append((item, mask, slot))
            arrays = [episode_arrays(ep, cache, plan.normalizer, cfg.chunk_length, cfg.max_state_dim,
                                     cfg.max_action_dim, cfg.human_gripper) for (ep, _, _, _, cache), _, _ in decoded]
            fast = [[] for _ in decoded]
            if plan.fast_tokenizer is not None:   # the batch's chunks in one call (encode_many)
                chunks = [fast_chunk(ep, t, cache, cfg.chunk_length)
                          for ((ep, t, _, _, _), _, _), cache in zip(decoded, arrays)]
                fast = encode_fast_chunks(plan.fast_tokenizer, chunks, [item[3] for item, _, _ in decoded])
            for ((ep, t, name, where, _), mask, slot), cache, fast_tokens in zip(decoded, arrays, fast):
                try:
                    if isinstance(fast_tokens, SampleError):
                        raise fast_tokens
                    rows.add(ep, t, cache, source=name, where=where, image_mask=mask, fast_tokens=fast_tokens)
                except EpisodeFormatError as e:  # a tokenizer refused this sample's text or chunk
                    self.counters.bad("bad_sample", f"{e} (timestep {t})")
                    continue
                if slot != rows.n - 1:   # a refused sample before it: its frames move up one slot
                    slots[rows.n - 1] = slots[slot]
        self.counters.add("samples_read", rows.n)
        text_pad = getattr(plan.text_tokenizer, "pad_id", 0) if plan.text_tokenizer is not None else 0
        batch = rows.batch(images, text_pad_id=int(text_pad))
        self.layout = rows.layout   # where its fields lie in the arena (worker_message)
        return batch


class MixtureStream(IterableDataset):
    """IterableDataset of (Batch, logical worker, worker state, image buffer index) for one rank."""

    def __init__(self, plan: Plan, worker_states: list[dict | None], worker_offset: int,
                 free_queues: list | None = None):
        self.plan, self.worker_states, self.worker_offset = plan, worker_states, worker_offset
        self.free_queues = free_queues   # per logical worker: buffers the main process gives back
        self.stream: WorkerStream | None = None

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        # DataLoader asks workers round-robin from physical worker 0; rotating the logical ids makes
        # batch i come from logical worker i % W even when a restored run starts mid-cycle.
        worker = (physical + self.worker_offset) % len(self.worker_states)
        self.stream = WorkerStream(self.plan, worker, self.worker_states[worker])
        free = self.free_queues[worker] if self.free_queues and info is not None else None
        mapped: set[int] = set()   # buffers the main process has already received (and keeps mapped)
        for batch, state, buffer_index in self.stream.batches(free):
            if info is None:
                yield batch, worker, state, buffer_index
                continue
            # To the main process: see buffers.worker_message. A buffer travels (as a shared-memory handle)
            # only the first time; later batches in it name its index only.
            first = buffer_index not in mapped
            mapped.add(buffer_index)
            images = self.stream.ring.buffers[buffer_index]
            yield (worker_message(batch, images if first else None, self.stream.layout),
                   worker, state, buffer_index)


def _keep_as_is(item):
    return item


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave Ctrl-C and a SIGTERM sent to the whole process group / job step (a
    terminal, `kill -- -PGID`, scancel) to the trainer, which saves at the step boundary and then
    shuts them down; dying first would fail that step. A SIGTERM from the parent itself (torch's
    and multiprocessing's shutdown `terminate()`) still ends the worker: SIGTERM is blocked and a
    thread reads each one with its sender (sigwaitinfo); ignoring it outright would hang the
    parent's exit in multiprocessing's join."""
    import signal
    import threading
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def exit_on_sigterm_from_parent() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent or os.getppid() != parent:
                os._exit(128 + signal.SIGTERM)

    threading.Thread(target=exit_on_sigterm_from_parent, name="sigterm-from-parent", daemon=True).start()


class StreamingLoader:
    """Endless iterable of Batch for one rank, with ``state_dict``/``load_state_dict``/``skip_counts``.

    Each ``iter()`` starts a torch DataLoader at the current state, so iterating again continues the
    stream rather than restarting it.
    """

    def __init__(self, plan: Plan):
        self.plan = plan
        self.normalizer = plan.normalizer
        # The stats in use (save them with checkpoints; pass back as build_loader(norm_stats=...)).
        self.norm_stats = plan.normalizer.stats if plan.normalizer is not None else None
        self.num_workers = plan.num_workers
        self._worker_states: list[dict | None] = [None] * max(1, plan.num_workers)
        self._consumed = 0

    def __iter__(self) -> Iterator[Any]:
        n = len(self._worker_states)
        workers = self.plan.num_workers
        free_queues = None
        if workers > 0:   # each worker's image buffers come back on its queue when a batch is dropped
            context = multiprocessing.get_context()
            free_queues = [context.Queue() for _ in range(n)]
            for q in free_queues:
                q.cancel_join_thread()   # never block interpreter exit on undelivered buffer indices
        dataset = MixtureStream(self.plan, list(self._worker_states), self._consumed % n, free_queues)
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_keep_as_is,
                            worker_init_fn=ignore_stop_signals, prefetch_factor=2 if workers > 0 else None)
        maps = BufferMaps()
        for item, worker, state, buffer_index in loader:
            batch = maps.batch(item, worker, buffer_index)
            self._worker_states[worker] = state
            self._consumed += 1
            release_when_dropped(batch.images, free_queues[worker] if free_queues else dataset.stream.ring,
                                 buffer_index)
            yield batch

    def _current(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "rank": self.plan.rank, "world_size": self.plan.world_size,
                "num_workers": self.plan.num_workers, "batches_consumed": self._consumed,
                "stream": self.plan.stream_settings, "workers": self._worker_states}

    def state_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._current()))  # a deep copy in plain JSON types

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_compatible(state, self._current())
        self._worker_states = [None if w is None else dict(w) for w in state["workers"]]
        self._consumed = int(state["batches_consumed"])

    def skip_counts(self) -> dict[str, int]:
        """Skips per reason (shard_reader.SKIP_REASONS), summed over this rank's workers, as of the
        last consumed batch."""
        return {k: v for k, v in sum_counters(self._worker_states).items() if k not in READ_COUNTERS}

    def read_counts(self) -> dict[str, int]:
        """``episodes_read`` / ``samples_read`` (what was read, not skipped), as skip_counts."""
        totals = sum_counters(self._worker_states)
        return {k: totals.get(k, 0) for k in READ_COUNTERS}


def build_loader(data_cfg: DataConfig, text_tokenizer=None, fast_tokenizer=None, rank: int = 0,
                 world_size: int = 1, norm_stats: dict | None = None, seed: int | None = None,
                 split: str = "train", state_mode: str | None = None) -> StreamingLoader:
    """The trainer's reader. ``split="val"`` reads ``data.val_sources`` (equal weights, all combos).
    ``state_mode``: the model's (prompt.model_state_mode); "text" (π0.5) puts each sample's state in
    its prompt (prompt.prompt_tokens, as inference does)."""
    data_cfg.validate()
    check_state_mode(state_mode)
    if split not in ("train", "val"):
        raise ConfigError(f"split={split!r}; choose 'train' (data.sources) or 'val' (data.val_sources)")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank={rank} must be in [0, world_size={world_size})")
    val = split == "val"
    sources = data_cfg.val_sources if val else data_cfg.sources
    if not sources:
        raise ConfigError(f"data.{'val_sources' if val else 'sources'} is empty; name at least one shard set "
                          "directory (e.g. data.sources.robot=/tmp/s)")
    weights = {name: 1.0 for name in sources} if val else data_cfg.resolved_mixture()
    # Per-set checks shared with `megavla data verify`: a refused set stops here, before any work.
    need_stats = data_cfg.normalization != "none" and norm_stats is None
    checked = {name: read_manifest(d, need_stats=need_stats, on_bad=data_cfg.on_bad_sample)
               for name, d in sources.items() if weights[name] > 0}
    manifests = {name: shards for name, (shards, _) in checked.items()}
    universe = {c for shards in manifests.values() for s in shards for c in s.combos}
    fraction = 1.0 if val else data_cfg.diversity_fraction
    kept = select_combos(universe, fraction, data_cfg.diversity_seed,
                         data_cfg.include_combos, data_cfg.exclude_combos)
    eligible: dict[str, list[ShardInfo]] = {}
    slots = world_size * max(1, data_cfg.num_workers)
    for name, shards in manifests.items():
        eligible[name] = [s for s in shards if kept.intersection(s.combos)]
        if not eligible[name]:
            raise ConfigError(f"source {name!r} ({sources[name]}): no shard holds a kept combo "
                              f"(diversity_fraction={fraction}, {len(kept)} of {len(universe)} combos kept)")
        if len(eligible[name]) < slots:
            log.warning("source %s: %d shards < %d ranks x workers; every slot reads all of them (in its "
                        "own order)", name, len(eligible[name]), slots)
        log.info("source %s: %d/%d shards hold kept combos", name, len(eligible[name]), len(shards))
    log.info("diversity: keeping %d of %d scene x task combos (fraction %.3f)", len(kept), len(universe), fraction)

    normalizer = None
    if data_cfg.normalization != "none":
        if norm_stats is None:
            norm_stats = merge_norm_stats([stats for _, stats in checked.values()])
        missing = {e for shards in manifests.values() for s in shards for e in s.embodiments} - set(norm_stats)
        if missing:
            raise ConfigError(f"norm stats lack embodiments {sorted(missing)} that the manifests list")
        if data_cfg.human_gripper == "closure":  # human gripper dims: the gripper convention's [0, 1] range
            norm_stats = with_human_gripper_range(norm_stats)
        normalizer = Normalizer(norm_stats, data_cfg.normalization, data_cfg.normalization_floor)
    seed = data_cfg.seed if seed is None else seed
    if seed < 0:
        raise ConfigError(f"loader seed={seed} must be >= 0 (data.seed or build_loader(seed=...))")
    settings = {
        "seed": seed, "split": split,
        "weights": weights, "shards": {n: [Path(s.path).name for s in v] for n, v in eligible.items()},
        "kept_combos": sorted(kept), **{k: getattr(data_cfg, k) for k in (
            "chunk_length", "max_action_dim", "max_state_dim", "cameras", "image_size", "batch_size",
            "shuffle_buffer", "samples_per_episode", "normalization")},
        # Only when not the default, so loader states saved before the option existed still restore.
        **({"human_gripper": data_cfg.human_gripper} if data_cfg.human_gripper != "masked" else {}),
    }
    validator = EpisodeValidator(normalizer.stats if normalizer is not None else None, ReadLimits.from_config(data_cfg))
    for name, shards in eligible.items():  # stats that do not fit a whole set: refused now, not per episode
        probe = read_first_episode(shards[0].path)
        try:
            if probe is not None:
                validator.check(*probe)
        except StatsMismatchError as e:
            raise ConfigError(f"source {name!r} ({sources[name]}): {e} [its first episode; the norm stats "
                              "do not fit this set, so the run is refused before it starts]") from None
        except EpisodeFormatError:
            pass  # one bad episode: the reader skips and counts it
    plan = Plan(cfg=data_cfg, seed=seed, rank=rank, world_size=world_size, num_workers=data_cfg.num_workers,
                sources=eligible, weights={n: weights[n] for n in manifests}, kept_combos=kept,
                normalizer=normalizer, validator=validator, text_tokenizer=text_tokenizer, fast_tokenizer=fast_tokenizer,
                stream_settings=json.loads(json.dumps(settings)), state_mode=state_mode)
    return StreamingLoader(plan)
