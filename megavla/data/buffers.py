"""Reused image buffers for batches: a buffer goes back to its producer when the consumer drops the
batch that used it.

Why: a fresh 7 MB uint8 image buffer per batch (16 x 3 x 224^2 x 3) costs its page faults again on
every batch -- measured on this VM 9.6 ms per batch in private memory and 17.8 ms in shared memory
(a DataLoader worker's), i.e. 1-2x the JPEG decoding of the whole batch (~8 ms). Reusing a buffer
costs no faults.

Protocol: the producer takes a buffer (`take()`: a free one, else a new one, so it never waits and
never overwrites a buffer in use); the consumer calls `release_when_dropped(batch.images, ring, id)`,
which returns the buffer to the producer's free list when that tensor object is garbage collected.
Contract for consumers: a Batch's `images` tensor stays valid while that tensor object (e.g. the Batch
holding it) is alive; a view kept after dropping it (`x = batch.images[0]; del batch`) may be
overwritten by a later batch -- `.clone()` what you keep. The trainer and the evaluators hold the
Batch while they use it. In a DataLoader worker the buffer's storage also holds the batch's other
fields (an Arena after the images); the main process copies those out, so only `images` is a view.
"""
from __future__ import annotations

import collections
import queue
import weakref
from typing import Any

import numpy as np
import torch

from megavla.batch import Batch


# Where a decoded frame starts, modulo 32 bytes. libjpeg-turbo's AVX2 colour conversion writes a
# 32-byte-aligned output row with non-temporal stores (they bypass the cache), any other row with plain
# stores. Measured on this box's EPYC VM (simplejpeg 1.9, 224^2 frames, one hot output buffer): 162-164
# us a frame at every multiple of 32, 146 at every other offset tried (1, 4, 8, 16, 24, 40, ... 80) --
# the 10 % that decode-only (which writes into whatever malloc returns) did not pay. A row is 224 x 3
# = 672 bytes and a frame 150,528 (both multiples of 32), so one offset of the whole buffer moves every
# frame and row of the batch off the aligned path.
DECODE_OFFSET = 16


def off_alignment_buffer(shape: tuple[int, ...], shared: bool = False, extra_bytes: int = 0) -> torch.Tensor:
    """uint8 tensor of `shape` whose data starts DECODE_OFFSET bytes past a 64-byte boundary (torch
    allocates at 64); in shared memory when `shared` (decoded straight into it: no copy when the batch
    crosses processes). A view of a slightly larger storage (plus `extra_bytes` after it: a worker's
    field arena, see Arena): it pickles to a worker's peer as storage + offset."""
    numel = 1
    for n in shape:
        numel *= n
    flat = torch.empty(DECODE_OFFSET + numel + extra_bytes, dtype=torch.uint8)
    if shared:
        flat.share_memory_()
    return flat[DECODE_OFFSET : DECODE_OFFSET + numel].view(shape)


def storage_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The whole storage under `tensor` as a flat uint8 numpy array (a view)."""
    return torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage()).numpy()


class Arena:
    """A worker's batch fields, carved out of the shared storage of its image buffer (after the
    images), so they reach the main process with the images instead of pickled through the worker's
    pipe: ~36 KB a batch of 16 at the demo sizes, which the worker's queue feeder thread pickled and
    wrote (~4 % of a worker's CPU, measured per thread with /proc/<tid>/schedstat). Arrays are carved
    in order, 64-byte aligned; ``take`` returns None when the rest does not fit (the field then goes
    by value). Reused for every batch in that buffer: what a batch does not overwrite is stale."""

    def __init__(self, images: torch.Tensor):
        self.bytes = storage_bytes(images)
        self.start = DECODE_OFFSET + images.numel()
        self.used = self.start

    def take(self, shape: tuple[int, ...], dtype) -> tuple[np.ndarray, int] | None:
        """(array, its byte offset in the buffer's storage), or None when it does not fit."""
        dtype = np.dtype(dtype)
        start = -(-self.used // 64) * 64
        nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        if start + nbytes > len(self.bytes):
            return None
        self.used = start + nbytes
        return self.bytes[start : start + nbytes].view(dtype).reshape(shape), start


class BufferRing:
    """Image buffers of one producer (the main process, or one DataLoader worker: then the buffers
    are in shared memory and the free list is a multiprocessing queue filled by the main process)."""

    def __init__(self, shape: tuple[int, ...], free: Any = None, shared: bool = False, fields_bytes: int = 0):
        self.shape, self.shared, self.fields_bytes = tuple(shape), shared, fields_bytes
        self.free = free if free is not None else collections.deque()
        self.buffers: list[torch.Tensor] = []

    def take(self) -> tuple[int, torch.Tensor]:
        try:
            index = self.free.popleft() if isinstance(self.free, collections.deque) else self.free.get_nowait()
        except (IndexError, queue.Empty):
            self.buffers.append(off_alignment_buffer(self.shape, shared=self.shared, extra_bytes=self.fields_bytes))
            index = len(self.buffers) - 1
        return index, self.buffers[index]

    def give_back(self, index: int) -> None:
        if isinstance(self.free, collections.deque):
            self.free.append(index)
        else:
            self.free.put(index)


def release_when_dropped(images: torch.Tensor, ring_or_queue: Any, index: int) -> None:
    """Return buffer `index` to its producer once `images` (the consumer's tensor) is collected."""
    give_back = ring_or_queue.give_back if isinstance(ring_or_queue, BufferRing) else ring_or_queue.put
    weakref.finalize(images, give_back, index)


def worker_message(batch: Batch, buffer: torch.Tensor | None,
                   layout: dict[str, tuple[int, str, tuple[int, ...]]] | None = None) -> dict[str, Any]:
    """A worker's batch for the main process. Each field but images: its place in the Arena of the
    batch's image buffer, ``layout[name]`` = (byte offset in the buffer's storage, numpy dtype string,
    shape), when it has one; else a numpy array pickled by value through the worker's pipe. Never one
    fresh shared-memory segment per tensor (13 per batch, ~1.3 ms per batch of worker CPU). The image
    buffer itself travels only the first time it is used (``buffer``): sending a shared-memory tensor
    costs a file-descriptor hand-over (multiprocessing's resource sharer: a socket connection with an
    HMAC challenge) -- measured ~180 us of worker CPU and as much of the main process's per batch; the
    main process keeps the ones it received (BufferMaps) and rebuilds the images view and the arena's
    fields from the index."""
    layout = layout or {}
    fields = {k: layout[k] if k in layout else v.numpy() for k, v in batch.tensors().items() if k != "images"}
    return {"fields": fields, "meta": batch.meta, "buffer": buffer}


class BufferMaps:
    """The main process's side of worker_message: (worker, buffer index) -> the shared buffer."""

    def __init__(self):
        self.buffers: dict[tuple[int, int], torch.Tensor] = {}
        self.arenas: dict[tuple[int, int], np.ndarray] = {}   # the same storages, as flat bytes

    def batch(self, item: Any, worker: int, buffer_index: int) -> Batch:
        if isinstance(item, Batch):   # the main process's own stream (no workers)
            return item
        if item["buffer"] is not None:
            self.buffers[worker, buffer_index] = item["buffer"]
            self.arenas[worker, buffer_index] = storage_bytes(item["buffer"])
        arena = self.arenas[worker, buffer_index]
        fields = {}
        for k, v in item["fields"].items():
            if isinstance(v, tuple):   # in the arena: copied out, the worker reuses it for a later batch
                offset, dtype, shape = v
                nbytes = np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
                v = arena[offset : offset + nbytes].view(dtype).reshape(shape).copy()
            fields[k] = torch.from_numpy(v)
        n = int(fields["actions"].shape[0])
        images = self.buffers[worker, buffer_index][:n].permute(0, 1, 4, 2, 3)   # as collate_samples makes it
        return Batch(images=images, **fields, meta=item["meta"])
