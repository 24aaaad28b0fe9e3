"""Host (CPU) heap policy for training processes.

glibc's malloc serves a request of at least M_MMAP_THRESHOLD bytes with its own mmap, which goes back
to the OS on free; smaller ones come from the heap, whose free chunks stay in the process. The
threshold starts at 128 KiB and is *dynamic*: each freed mmapped chunk raises it to that chunk's size,
up to 32 MiB. Training frees tensors of a few MiB all the time (activations; under ZeRO-3 every
layer's gathered weights and gradients, twice per step), so after the first step they all land in
the heap, and chunks of varying sizes freed in varying order fragment it: measured on the `small`
preset, 4 CPU ranks, ZeRO-3, the heap held 1076 MB of free chunks after 3 steps (ZeRO-2: 426 MB) and
ZeRO-3's step peak per rank sat ~150 MB *above* ZeRO-2's although its model states are 194 MB smaller
(benchmarks/RESULTS.md, "ZeRO-3 build"). A fixed threshold turns the dynamic adjustment off: freed
tensors of at least the threshold go back to the OS, so resident memory follows the live tensors.

The default (train.malloc_mmap_threshold_kb=0) has two phases. While the model is built, pretrained
weights are loaded, the engine is created and a checkpoint restored: 128 KiB (everything a build
frees goes back). Then, for the steps: under ZeRO-3, 1 MiB (trim threshold 2 MiB); under ZeRO-0/1/2,
32 MiB (trim 64 MiB), where glibc's dynamic threshold ends up anyway. Each fresh mapping pays its page
faults, so a low step threshold trades CPU time for memory: the trade ZeRO-3 is chosen for, while
ZeRO-2 runs keep their speed. Measured on `small`, fp32, batch 1, 2 timed steps: peak RSS per rank
(MB) / step time (s), two runs a cell (128 KiB: one). Step times on this shared 2-core box vary
+-10 % run to run, and 4 ranks share the 2 cores, where page faults cost less wall time:

    steps' threshold  ZeRO-2 @4           ZeRO-3 @4            ZeRO-2 @2           ZeRO-3 @2
    32 MiB            2009-2037 / 9.0-9.7  2140-2305 / 11.5-14.1  2736-2761 / 4.4      2666-2804 / 5.3-5.6
    4 MiB             1870-1963 / 8.9      1783-1893 / 12.3-12.7
    1 MiB             1687-1698 / 9.2-9.3  1615-1636 / 13.8-14.5  2403-2419 / 5.0-6.1  2140-2152 / 7.0-7.3
    128 KiB           1652 / 10.1          1524 / 14.9

1 MiB is the largest threshold at which ZeRO-3's peak at 4 ranks is below ZeRO-2's in every run even
at the same threshold (4 MiB overlaps); against ZeRO-2's default (32 MiB) the gap is ~400 MB. On a GPU
the parameters, gathers and activations live in device memory and none of this applies. A fixed
train.malloc_mmap_threshold_kb=N holds from process start, build included, for every stage.
malloc_trim(0) after each optimizer step instead (~0.1 s per step) left ZeRO-3's peak only ~2 % below
ZeRO-2's: the fragmentation happens within a step. Not used: mimalloc (LD_PRELOAD; ZeRO-3 @4
1639-1649 MB but 14.4 s) and glibc's hugetlb=1 tunable with transparent huge pages (16.1 s at 1 MiB):
both need the variable set before the process starts, for no gain over the default.
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


# The build phase's threshold, and the steps' (see above). Measured for the build (a 186M-parameter
# PaliGemma-sized model + its checkpoint loaded, 4 CPU ranks, ZeRO-3): anonymous memory per rank
# 882-901 -> 629 MB built and 1007-1076 -> 632 MB after loading (a plain build: 902).
BUILD_PHASE_KIB = 128
ZERO3_STEPS_BYTES = 1 << 20
OTHER_STEPS_BYTES = MAX_THRESHOLD_BYTES


def start_build_phase(kib: int) -> bool:
    """Call before building the model when train.malloc_mmap_threshold_kb is `kib`: with 0 (the
    default), fixes the threshold for the build and returns True; with a fixed one, changes nothing."""
    return kib <= 0 and set_mmap_threshold(BUILD_PHASE_KIB)


def end_build_phase(started: bool, zero_stage: int) -> None:
    """After the engine is built (and a checkpoint restored): the thresholds the steps run with
    (trim threshold twice the mmap threshold, as glibc's dynamic adjustment keeps it)."""
    mallopt = _mallopt() if started else None
    if mallopt is not None:
        steps = ZERO3_STEPS_BYTES if zero_stage == 3 else OTHER_STEPS_BYTES
        mallopt(M_MMAP_THRESHOLD, steps)
        mallopt(M_TRIM_THRESHOLD, 2 * steps)


def set_mmap_threshold(kib: int) -> bool:
    """Fix glibc's mmap threshold at `kib` KiB (0: nothing here; the default's two phases are set by
    start_build_phase / end_build_phase). Returns whether it was set; False (logged) on a libc
    without mallopt, e.g. musl or macOS, where nothing changes."""
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
