"""Issue 16 item 5: under ZeRO-3 a rank's peak host memory follows its partition. The real
train-step benchmark (zero.Init build, DeepSpeed engine, forward + backward + optimizer step of the
`small` VLA) runs at 2 and 4 CPU ranks with the default heap policy (train.malloc_mmap_threshold_kb=0,
megavla/train/host_memory.py: 128 KiB while building, then for the steps 1 MiB under ZeRO-3 and
32 MiB under ZeRO-2); peak RSS per rank under ZeRO-3 at 4 ranks must be below ZeRO-2's at 4 ranks and
below ZeRO-3's at 2 ranks. With ZeRO-3's steps at 32 MiB too (glibc's dynamic end point), the heap
fragments and ZeRO-3 at 4 ranks peaked at 2140-2305 MB against ZeRO-2's 2009-2037 MB
(benchmarks/RESULTS.md), so this test fails there.

What the item asks first -- build a model larger than a rank's memory -- is the peak before the first
step: model build (under zero.Init) + engine creation. The second slow test checks that ordering with
the benchmark's build-only mode (`--steps 0`)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from megavla.config import ConfigError
from megavla.config.train import TrainConfig
from megavla.train.host_memory import set_mmap_threshold

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_train_step", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    return bench


def test_mmap_threshold_setting():
    assert set_mmap_threshold(0) is False                 # 0 = leave glibc's dynamic default
    if sys.platform.startswith("linux"):
        assert set_mmap_threshold(128) is True
    with pytest.raises(ValueError, match="maximum"):
        set_mmap_threshold(65536)
    with pytest.raises(ConfigError, match="malloc_mmap_threshold_kb"):
        TrainConfig(malloc_mmap_threshold_kb=40000).validate()


def test_build_phase_thresholds(monkeypatch):
    """With the default setting (0) the build phase fixes the threshold at 128 KiB; the steps run at
    1 MiB (trim 2 MiB) under ZeRO-3 and 32 MiB (trim 64 MiB) under the other stages; a user-fixed
    threshold is left alone."""
    from megavla.train import host_memory
    calls = []
    monkeypatch.setattr(host_memory, "_mallopt", lambda: lambda opt, value: calls.append((opt, value)) or 1)
    assert host_memory.start_build_phase(0) is True
    assert calls == [(host_memory.M_MMAP_THRESHOLD, 128 << 10)]
    host_memory.end_build_phase(True, zero_stage=3)
    assert calls[1:] == [(host_memory.M_MMAP_THRESHOLD, 1 << 20), (host_memory.M_TRIM_THRESHOLD, 2 << 20)]
    for stage in (0, 1, 2):
        calls.clear()
        host_memory.end_build_phase(True, zero_stage=stage)
        assert calls == [(host_memory.M_MMAP_THRESHOLD, 32 << 20), (host_memory.M_TRIM_THRESHOLD, 64 << 20)]
    calls.clear()
    assert host_memory.start_build_phase(256) is False
    host_memory.end_build_phase(False, zero_stage=3)
    assert calls == []


@pytest.mark.slow   # ~6 min on the 2-core box: three multi-process runs of the 108M-parameter preset
def test_zero3_peak_rss_per_rank_is_below_zero2_and_falls_with_ranks(tmp_path):
    bench = load_benchmark()

    def peaks(stage, nproc):
        row = bench.run_config("small", stage, nproc, steps=1, batch=1, tmp=tmp_path, malloc_mmap_threshold_kb=0)
        print(row["mode"], nproc, "ranks: peak RSS per rank", row["peak_mb"], "MB")
        assert len(row["peak_mb"]) == nproc
        return row["peak_mb"]

    zero2_at_4, zero3_at_4, zero3_at_2 = peaks(2, 4), peaks(3, 4), peaks(3, 2)
    # Measured at 4 ranks: ZeRO-3 1595-1636 MB, ZeRO-2 2009-2044 (the spread between ranks of one run
    # is < 40 MB; with ZeRO-2's steps at 1 MiB too it measured 1672-1698, still above).
    assert max(zero3_at_4) < 0.9 * min(zero2_at_4), (zero3_at_4, zero2_at_4)
    assert max(zero3_at_4) < 0.85 * min(zero3_at_2), (zero3_at_4, zero3_at_2)


@pytest.mark.slow   # ~2-3 min on the 2-core box: three multi-process builds of the 108M-parameter preset
def test_zero3_build_peak_per_rank_is_below_zero2_and_falls_with_ranks_with_the_default_heap(tmp_path):
    """Peak RSS per rank after the model build + DeepSpeed engine (before any step), the default
    setting (malloc_mmap_threshold_kb=0: the build phase of host_memory returns freed build tensors to
    the OS). Measured: ZeRO-2 @4 1085-1086 MB, ZeRO-3 @4 667-668 (841-1013 before the build phase),
    ZeRO-3 @2 977-978 (1234-1372)."""
    bench = load_benchmark()

    def peaks(stage, nproc):
        row = bench.run_config("small", stage, nproc, steps=0, batch=1, tmp=tmp_path, malloc_mmap_threshold_kb=0)
        print(row["mode"], nproc, "ranks: peak RSS per rank after the engine", row["engine_peak_mb"], "MB")
        assert len(row["engine_peak_mb"]) == nproc and row["peak_mb"] is None   # no step ran
        return row["engine_peak_mb"]

    zero2_at_4, zero3_at_4, zero3_at_2 = peaks(2, 4), peaks(3, 4), peaks(3, 2)
    assert max(zero3_at_4) < 0.97 * min(zero2_at_4), (zero3_at_4, zero2_at_4)
    assert max(zero3_at_4) < 0.9 * min(zero3_at_2), (zero3_at_4, zero3_at_2)
