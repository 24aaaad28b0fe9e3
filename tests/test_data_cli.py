"""`megavla data synth | inspect | stats | verify` end to end on a tiny 64px set."""
from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from megavla.data.cli import main
from megavla.data_shards.manifest import load_manifest

FAKE = "helpers.toy_episodes:fake_generate_episode"
TINY = ["--scenes", "2", "--tasks", "2", "--episodes-per-combo", "2", "--image-size", "64",
        "--shard-size-mb", "0.05", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    assert main(["synth", "--out", str(out), "--workers", "2", "--generator", FAKE, *TINY]) == 0
    return out


def test_synth_writes_one_set_per_family(tiny_set, capsys):
    for fam, emb in (("robot", "robot/arm"), ("human", "human/ego")):
        m = load_manifest(tiny_set / fam)
        assert m["totals"]["embodiments"] == {emb: 8}
        assert m["totals"]["combos"][emb] == ["0:0", "0:1", "1:0", "1:1"]
        assert m["totals"]["shards"] > 1  # 0.05 MiB shards force roll-over
        assert m["generator"]["image_size"] == 64 and m["generator"]["embodiments"] == [emb]
        assert (tiny_set / fam / "norm_stats.json").is_file()


def test_synth_is_deterministic_across_worker_counts(tiny_set, tmp_path):
    assert main(["synth", "--out", str(tmp_path), "--workers", "1", "--generator", FAKE, *TINY]) == 0
    for fam in ("robot", "human"):
        a = [r["sha256"] for r in load_manifest(tiny_set / fam)["shards"]]
        b = [r["sha256"] for r in load_manifest(tmp_path / fam)["shards"]]
        assert a == b


def test_inspect_reports_robot_and_human(tiny_set, capsys):
    assert main(["inspect", str(tiny_set)]) == 0
    out = capsys.readouterr().out
    assert "robot/arm" in out and "human/ego" in out
    assert "4 (2 scenes x 2 tasks)" in out and "8 / 8" in out
    assert main(["inspect", str(tiny_set / "robot"), "--json"]) == 0
    (summary,) = json.loads(capsys.readouterr().out)
    assert summary["episodes"] == 8 and summary["steps"] == 8 * 6
    assert summary["embodiments"]["robot/arm"]["combos"] == 4


def test_stats_recompute_matches_stored(tiny_set, capsys):
    assert main(["stats", str(tiny_set), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count("largest difference: 0") == 2, out


def test_verify_clean_then_corrupted_copy(tiny_set, tmp_path, capsys):
    assert main(["verify", str(tiny_set), "--no-progress"]) == 0
    assert capsys.readouterr().out.count(": OK") == 2
    bad = tmp_path / "bad"
    shutil.copytree(tiny_set, bad)
    shard = bad / "robot" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0x55
    shard.write_bytes(bytes(data))
    assert main(["verify", str(bad), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert f"ERROR {shard}: sha256" in out and "errors in 1 shards" in out
    assert f"{bad / 'human'}:" in out and out.count(": OK") == 1


def test_refusals(tiny_set, tmp_path, capsys):
    assert main(["synth", "--out", str(tiny_set), "--generator", FAKE, *TINY]) == 2  # exists
    assert main(["synth", "--out", str(tmp_path / "x"), "--embodiments", "robot/leg",
                 "--generator", FAKE, *TINY]) == 2
    assert not (tmp_path / "x").exists()
    assert main(["inspect", str(tmp_path)]) == 1  # no shard set here
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "shard-000000.tar.partial").write_bytes(b"")
    assert main(["verify", str(tmp_path)]) == 1


def test_generator_dying_midway_leaves_no_manifest(tmp_path):
    with pytest.raises(SystemExit, match="not importable"):
        main(["synth", "--out", str(tmp_path / "y"), "--generator", "helpers.toy_episodes:nope", *TINY])
    with pytest.raises(RuntimeError, match="simulated generator crash"):
        main(["synth", "--out", str(tmp_path / "z"), "--workers", "2",
              "--generator", "helpers.toy_episodes:crashing_generate_episode", *TINY])
    assert sorted(p.name for p in (tmp_path / "z").iterdir()) == ["human", "robot"]
    assert [list((tmp_path / "z" / fam).iterdir()) for fam in ("human", "robot")] == [[], []]


@pytest.mark.skipif(importlib.util.find_spec("megavla.data_shards.synth") is None,
                    reason="mini-world generator (data_shards/synth.py) not landed")
def test_real_generator_end_to_end(tmp_path, capsys):
    args = ["--scenes", "2", "--tasks", "1", "--episodes-per-combo", "1", "--image-size", "64",
            "--no-progress", "--workers", "1"]
    assert main(["synth", "--out", str(tmp_path), *args]) == 0
    assert main(["verify", str(tmp_path), "--no-progress"]) == 0
    assert main(["stats", str(tmp_path), "--no-progress"]) == 0
