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
import functools
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1          # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MAX_THRESHOLD_BYTES = 32 << 20  # glibc's HEAP_MAX_SIZE / 2 on 64-bit: mallopt refuses larger values


@functools.cache   # find_library runs ldconfig: once per process, not at every threshold change
def _mallopt():
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        log.info("no glibc mallopt in %s: heap thresholds left at the libc's defaults", name)
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return mallopt


# The build phase (model build, pretrained weights, engine, checkpoint restore) with the default
# setting (train.malloc_mmap_threshold_kb=0): the threshold is fixed at 128 KiB while it runs, so every
# tensor it frees (a ZeRO-3 module before its partition, a gathered weight, a checkpoint tensor) goes
# back to the OS and peak memory follows what stays live; then it is fixed at glibc's dynamic maximum
# (32 MiB, trim threshold 64 MiB), where the dynamic default ends up once training frees tensors of that
# size -- so the steps run as with the default heap, without a build's worth of free chunks in it.
# Measured (a 186M-parameter PaliGemma-sized model + its checkpoint loaded, 4 CPU ranks, ZeRO-3): anonymous
# memory per rank 882-901 -> 629 MB built and 1007-1076 -> 632 MB after loading (a plain build: 902).
BUILD_PHASE_KIB = 128
AFTER_BUILD_BYTES, AFTER_BUILD_TRIM_BYTES = MAX_THRESHOLD_BYTES, 2 * MAX_THRESHOLD_BYTES


def start_build_phase(kib: int) -> bool:
    """Call before building the model when train.malloc_mmap_threshold_kb is `kib`: with 0, fixes the
    threshold for the build (see above) and returns True; with a fixed threshold, changes nothing."""
    return kib <= 0 and set_mmap_threshold(BUILD_PHASE_KIB)


def end_build_phase(started: bool) -> None:
    """After the engine is built (and a checkpoint restored): the thresholds training runs with."""
    mallopt = _mallopt() if started else None
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, AFTER_BUILD_BYTES)
        mallopt(M_TRIM_THRESHOLD, AFTER_BUILD_TRIM_BYTES)


def set_mmap_threshold(kib: int) -> bool:
    """Fix glibc's mmap threshold at `kib` KiB (0: leave glibc's dynamic default). Returns whether it
    was set; False (logged) on a libc without mallopt, e.g. musl or macOS, where nothing changes."""
    if kib <= 0:
        return False
    if kib * 1024 > MAX_THRESHOLD_BYTES:
        raise ValueError(f"mmap threshold {kib} KiB is above glibc's maximum of {MAX_THRESHOLD_BYTES >> 10} KiB")
    mallopt = _mallopt()
    if mallopt is None:
        return False
    if mallopt(M_MMAP_THRESHOLD, kib * 1024) != 1:
        log.warning("mallopt(M_MMAP_THRESHOLD, %d KiB) failed: heap mmap threshold left at glibc's default", kib)
        return False
    return True
