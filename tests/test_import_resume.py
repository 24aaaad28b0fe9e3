"""Resumable imports: a failed or SIGKILLed import continues after its last committed shard, writes
no episode twice, keeps its earlier skips, and ends byte-identical to an uninterrupted import."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("pyarrow", reason="pip install -e .[import] (pyarrow<22 with numpy<2)")
pytest.importorskip("av")

from megavla.data_shards import import_lerobot  # noqa: E402
from megavla.data_shards.importing import SkipEpisode, SourceEpisode, run_import  # noqa: E402
from megavla.data_shards.manifest import load_manifest  # noqa: E402
from megavla.data_shards.writer import JOURNAL_FILE, JournalError  # noqa: E402

SRC = str(Path(__file__).parent / "fixtures" / "lerobot_v30_tiny")
GEN = {"importer": "lerobot", "source": SRC}


def _plan():
    return import_lerobot.plan(SRC, None, "observation.state", "action", "joint", None, 32, 0)[1]


def _shas(out: Path) -> list[str]:
    return [r["sha256"] for r in load_manifest(out)["shards"]]


class Flaky:
    """convert() that skips episode 0 and dies on the extra source episode "die" (a crash)."""

    def __init__(self):
        self.calls = []

    def __call__(self, locator):
        if locator == "die":
            raise RuntimeError("killed")
        index = locator[1]["episode_index"]
        self.calls.append(index)
        if index == 0:
            raise SkipEpisode("episode 0: pretend its video is broken")
        return import_lerobot.convert(locator)


def _crash(out: Path, episodes) -> None:
    with pytest.raises(RuntimeError, match="killed"):
        run_import(out, episodes + [SourceEpisode("episode 99", "die")], Flaky(), GEN, shard_bytes=1,
                   progress=False)


def test_failed_import_resumes_without_duplicates(tmp_path):
    episodes = _plan()
    # Uninterrupted reference; shard size 1 byte: every episode gets its own shard, and a shard
    # is committed when the next episode arrives.
    ref = run_import(tmp_path / "ref", episodes, Flaky(), GEN, shard_bytes=1, progress=False)
    assert ref.written == 2 and [s["episode"] for s in ref.skipped] == ["episode 0"]
    _crash(tmp_path / "out", episodes)
    assert not (tmp_path / "out/manifest.json").exists()
    journal = json.loads((tmp_path / "out" / JOURNAL_FILE).read_text())
    # committed: episode 1's shard (with the skip of episode 0 before it); episode 2 was in the
    # open shard and is redone
    assert len(journal["shards"]) == 1 and journal["progress"]["next"] == 2
    assert [s["episode"] for s in journal["progress"]["skipped"]] == ["episode 0"]
    resumed = Flaky()
    report = run_import(tmp_path / "out", episodes, resumed, GEN, shard_bytes=1, progress=False)
    assert report.resumed_from == 2 and resumed.calls == [2]  # neither 0 nor 1 again
    assert report.written == 2 and [s["episode"] for s in report.skipped] == ["episode 0"]
    assert _shas(tmp_path / "out") == _shas(tmp_path / "ref")
    assert load_manifest(tmp_path / "out")["generator"]["skipped"] == ref.skipped
    assert (tmp_path / "out/norm_stats.json").read_bytes() == (tmp_path / "ref/norm_stats.json").read_bytes()
    assert not (tmp_path / "out" / JOURNAL_FILE).exists()
    assert not list((tmp_path / "out").glob("*.partial"))


def test_resume_refuses_other_settings_and_changed_shards(tmp_path):
    episodes = _plan()
    _crash(tmp_path / "out", episodes)
    assert json.loads((tmp_path / "out" / JOURNAL_FILE).read_text())["shards"]
    with pytest.raises(JournalError, match="other settings"):
        run_import(tmp_path / "out", episodes, Flaky(), {**GEN, "image_size": 64}, shard_bytes=1,
                   progress=False)
    partial = next((tmp_path / "out").glob("*.tar.partial"))
    partial.write_bytes(partial.read_bytes()[:-10])
    with pytest.raises(JournalError, match="missing or changed"):
        run_import(tmp_path / "out", episodes, Flaky(), GEN, shard_bytes=1, progress=False)
    report = run_import(tmp_path / "out", episodes, Flaky(), GEN, shard_bytes=1, progress=False,
                        overwrite=True)
    assert report.resumed_from == 0 and report.written == 2


SLOW_IMPORT = """
import sys, time
from megavla.data_shards import import_lerobot
from megavla.data_shards.importing import run_import
def slow(locator):
    time.sleep(float(sys.argv[2]))
    return import_lerobot.convert(locator)
eps = import_lerobot.plan(sys.argv[3], None, "observation.state", "action", "joint", None, 32, 0)[1]
run_import(sys.argv[1], eps, slow, {"importer": "lerobot", "source": sys.argv[3]}, shard_bytes=1,
           progress=False)
"""


@pytest.mark.slow  # ~28 s: three subprocess imports; test_failed_import_resumes... covers the logic
def test_sigkilled_import_resumes_byte_identical(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", SLOW_IMPORT, str(tmp_path / "ref"), "0", SRC], check=True,
                   env=env, timeout=120)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_IMPORT, str(tmp_path / "out"), "1.5", SRC], env=env)
    deadline = time.time() + 90
    while not (tmp_path / "out" / JOURNAL_FILE).exists():  # first shard committed
        assert proc.poll() is None and time.time() < deadline, "import ended before a commit"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (tmp_path / "out/manifest.json").exists()
    committed = json.loads((tmp_path / "out" / JOURNAL_FILE).read_text())
    assert 1 <= len(committed["shards"]) < 3
    subprocess.run([sys.executable, "-c", SLOW_IMPORT, str(tmp_path / "out"), "0", SRC], check=True,
                   env=env, timeout=120)
    assert _shas(tmp_path / "out") == _shas(tmp_path / "ref")
    assert load_manifest(tmp_path / "out")["totals"]["episodes"] == 3
