"""Host (CPU) heap policy for training processes.

glibc's malloc serves a request of at least M_MMAP_THRESHOLD bytes with its own mmap, which goes back
to the OS on free; smaller ones come from the heap, whose free chunks stay in the process. The
threshold starts at 128 KiB and is *dynamic*: each freed mmapped chunk raises it to that chunk's size,
up to 32 MiB. Training frees tensors of a few MiB all the time (activations; under ZeRO-3 every
layer's gathered weights and gradients, twice per step), so after the first step they all land in
the heap, and chunks of varying sizes freed in varying order fragment it: measured on the `small`
preset, 4 CPU ranks, ZeRO-3, the heap held 1076 MB of free chunks after 3 steps (ZeRO-2: 426 MB) and
the process's RSS grew by ~50-100 MB every step (benchmarks/RESULTS.md, "ZeRO-3 build"). A fixed
threshold turns the dynamic adjustment off, so freed tensors of >= the threshold go back to the OS and
resident memory follows the live tensors: train.malloc_mmap_threshold_kb=128 (glibc's starting value,
kept fixed) measured lower than 1024 (ZeRO-3 peak 1450 vs 1550 MB; at 1024 the heap still held ~210 MB
of free sub-MiB chunks: small layers' gathered weights and gradients).

It is off by default because every such allocation then pays a fresh mapping's page faults: measured
on `small`, 2 CPU ranks, the ZeRO-3 step took 14.7 s instead of 7.1 s (system CPU 32 vs 14 s) and
ZeRO-2's 11.3 s instead of 8.8 s. Turn it on where host memory, not CPU time, is the limit (CPU-only
ZeRO-3 runs, host-side weight loading). malloc_trim(0) after each optimizer step was cheaper (~0.1 s
per step) but left ZeRO-3's peak only ~2 % below ZeRO-2's: the fragmentation happens within a step.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3          # glibc <malloc.h>
MAX_THRESHOLD_BYTES = 32 << 20  # glibc's HEAP_MAX_SIZE / 2 on 64-bit: mallopt refuses larger values


def set_mmap_threshold(kib: int) -> bool:
    """Fix glibc's mmap threshold at `kib` KiB (0: leave glibc's dynamic default). Returns whether it
    was set; False (logged) on a libc without mallopt, e.g. musl or macOS, where nothing changes."""
    if kib <= 0:
        return False
    if kib * 1024 > MAX_THRESHOLD_BYTES:
        raise ValueError(f"mmap threshold {kib} KiB is above glibc's maximum of {MAX_THRESHOLD_BYTES >> 10} KiB")
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.info("no glibc mallopt in %s: heap mmap threshold left at the libc's default", name)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    if mallopt(M_MMAP_THRESHOLD, kib * 1024) != 1:
        log.warning("mallopt(M_MMAP_THRESHOLD, %d KiB) failed: heap mmap threshold left at glibc's default", kib)
        return False
    return True
