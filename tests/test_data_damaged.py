"""Damaged shard sets through `megavla data verify` and the streaming reader (issue 14).

Every case runs both under a deadline (SIGALRM: a reader that blocks fails the test instead of
hanging the suite) and checks they agree: verify exits 1 with the message the reader logs when it
skips, or raises when it refuses; verify exits 0 only when the reader reads every episode.
``measure(case)`` gives one row of the closing note's table (verify -> reader).
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers.damaged_shards import deadline, episodes, npy, reader_cfg, run_reader, run_verify, write
from helpers.shard_sets import TinyTextTokenizer, make_episode
from megavla.config.data import DataConfig
from megavla.data.cli import main as data_cli
from megavla.data.pipeline import build_loader
from megavla.data_shards.format import episode_to_sample


def edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


# --- the damage of each case -----------------------------------------------------------------
def fifo_shard(d):
    (d / "shard-000001.tar").unlink()
    os.mkfifo(d / "shard-000001.tar")


def absurd_action(samples, eps):
    actions = eps[1].actions.copy()
    actions[2, 1] = 3e38  # finite, but inf once normalized
    samples[1]["actions.npy"] = npy(actions)


def nan_stats(d):
    edit_json(d / "norm_stats.json", lambda s: s["robot/arm"]["actions"]["q99"].__setitem__(2, float("nan")))


def inverted_stats(d):
    def invert(s):
        q = s["robot/arm"]["state"]
        q["q01"][1], q["q99"][1] = q["q99"][1], q["q01"][1]
    edit_json(d / "norm_stats.json", invert)


def lone_surrogate(samples, eps):
    meta = json.loads(samples[2]["meta.json"])
    meta["instruction"] = "pick \ud800 up"  # json.dumps writes the valid escape \\ud800
    samples[2]["meta.json"] = json.dumps(meta).encode()


def human_in_robot_shard(samples, eps):
    human = make_episode(0, 1, 0, human=True, steps=6)
    samples[1] = episode_to_sample(human)


def zero_steps(samples, eps):
    meta = json.loads(samples[4]["meta.json"])
    meta["num_steps"] = 0
    samples[4] = {"__key__": samples[4]["__key__"], "meta.json": json.dumps(meta).encode(),
                  "state.npy": npy(np.zeros((0, 4), np.float32)), "actions.npy": npy(np.zeros((0, 5), np.float32)),
                  "action_mask.npy": npy(np.ones(5, bool)), "step_valid.npy": npy(np.zeros(0, bool))}
    meta["cameras"] = {}
    samples[4]["meta.json"] = json.dumps(meta).encode()


def state_dims_differ(samples, eps):
    samples[3]["state.npy"] = npy(np.ones((6, 3), np.float32))  # stats have 4 dims


def stats_fewer_dims(d):
    def drop(s):
        for k in ("mean", "std", "q01", "q99"):
            s["robot/arm"]["actions"][k].pop()
    edit_json(d / "norm_stats.json", drop)


def duplicate_in_shard(samples, eps):
    samples[2] = dict(samples[0])  # shard 0 holds episodes 0, 1, 0


def duplicate_across_shards(samples, eps):
    # Episode 1 in shard 0 and shard 1, and the key lists say so (as a hand-merged set would).
    samples[4] = dict(samples[1])
    eps[4] = eps[1]


def no_key_list(d):
    """A set written before episode_keys.json existed."""
    (d / "episode_keys.json").unlink()
    edit_json(d / "manifest.json", lambda m: m.pop("episode_keys"))


def empty_manifest(d):
    edit_json(d / "manifest.json", lambda m: m.__setitem__("shards", []))


def outside_path(d):
    outside = d.parent / "outside"
    outside.mkdir()
    shutil.copy(d / "shard-000001.tar", outside / "x.tar")
    edit_json(d / "manifest.json", lambda m: m["shards"][1].__setitem__("path", "../outside/x.tar"))


def absolute_path(d):
    edit_json(d / "manifest.json", lambda m: m["shards"][1].__setitem__("path", str(d / "shard-000001.tar")))


def zero_range_varying_dim(d):
    def squash(s):
        q = s["robot/arm"]["actions"]
        q["q01"][2] = q["q99"][2] = 0.0  # the data of dim 2 is N(0, 1)
    edit_json(d / "norm_stats.json", squash)


def non_square_frames(samples, eps):
    from helpers.shard_sets import CAMERA_LEVEL
    import simplejpeg
    for t in range(6):
        img = np.full((16, 32, 3), CAMERA_LEVEL["head"] + t, np.uint8)
        samples[0][f"head.{t:04d}.jpg"] = simplejpeg.encode_jpeg(img, quality=95, colorspace="RGB")


# name -> (damage to raw samples, damage to the written set, reader outcome, verify message part)
CASES = {
    "clean": (None, None, "read", None),
    "fifo_shard": (None, fifo_shard, "skip:bad_shard", "not a regular file but a FIFO"),
    "absurd_action_3e38": (absurd_action, None, "skip:bad_sample", "beyond +-100"),
    "nan_in_norm_stats": (None, nan_stats, "refuse", "robot/arm.actions.q99 is not finite in dims [2]"),
    "inverted_q01_q99": (None, inverted_stats, "refuse", "robot/arm.state: q01 > q99 in dims [1]"),
    "lone_surrogate_instruction": (lone_surrogate, None, "skip:bad_sample", "instruction is not valid Unicode"),
    "human_episode_in_robot_shard": (human_in_robot_shard, None, "skip:bad_sample",
                                     "embodiment 'human/ego' has no norm stats in this set"),
    "zero_step_episode": (zero_steps, None, "skip:bad_sample", "the episode is empty (0 steps)"),
    "state_dims_differ_from_stats": (state_dims_differ, None, "skip:bad_sample",
                                     "wrong shape, 3 dims but the robot/arm norm stats have 4"),
    "stats_fewer_dims_than_data": (None, stats_fewer_dims, "refuse",
                                   "wrong shape, 5 dims but the robot/arm norm stats have 4"),
    "duplicate_key_in_one_shard": (duplicate_in_shard, None, "skip:duplicate_episode",
                                   "episode key seen before in this shard"),
    "duplicate_key_in_two_shards": (duplicate_across_shards, None, "skip:duplicate_episode",
                                    "episode key also in shard-000000.tar; this later copy is skipped"),
    "duplicate_key_in_two_shards_no_key_list": (duplicate_across_shards, no_key_list, "read",
                                                "episode key also in shard-000000.tar: the reader would draw"),
    "manifest_shards_empty": (None, empty_manifest, "refuse", "'shards' is empty"),
    "manifest_path_outside_set": (None, outside_path, "refuse", "points outside the set"),
    "manifest_absolute_path": (None, absolute_path, "refuse", "points outside the set"),
    "zero_range_varying_dim": (None, zero_range_varying_dim, "refuse", "the robot/arm stats give dim 2 the range 0"),
    "non_square_frames": (non_square_frames, None, "read", None),
}


def build(tmp_path: Path, case: str) -> Path:
    mutate_samples, mutate_set, _, _ = CASES[case]
    d = write(tmp_path / case, mutate_samples)
    if mutate_set is not None:
        mutate_set(d)
    return d


def measure(tmp_path: Path, case: str) -> dict:
    d = build(tmp_path, case)
    code, text = run_verify(d)
    errors = [line for line in text.splitlines() if line.startswith("ERROR")]
    outcome, keys, skips, refusal = run_reader(d)
    return {"case": case, "verify_exit": code, "verify_first_error": errors[0] if errors else "",
            "reader": outcome, "reader_counts": skips, "refusal": refusal, "keys": keys, "verify_out": text}


@pytest.mark.parametrize("case", sorted(CASES))
def test_verify_and_reader_agree(tmp_path, case, caplog):
    _, _, expected, part = CASES[case]
    with caplog.at_level(logging.WARNING):
        row = measure(tmp_path, case)
    assert row["reader"] == expected, row
    if part is None:
        assert row["verify_exit"] == 0, row["verify_out"]
        assert row["keys"] == {e.key for e in episodes()}  # every episode read
        return
    assert row["verify_exit"] == 1 and part in row["verify_out"], row["verify_out"]
    # The same message: verify's text appears verbatim in what the reader logged or raised.
    message = next(line for line in row["verify_out"].splitlines() if part in line).split(": ", 1)[1]
    if expected == "refuse":
        assert message in row["refusal"], (message, row["refusal"])
    elif expected != "read":
        assert message in caplog.text, (message, caplog.text[-2000:])


def test_duplicate_across_shards_is_read_once_on_every_rank(tmp_path, caplog):
    """episode_keys.json shows the repeat at start without opening a shard: every rank drops the same
    later copy, so across ranks each key is read from one shard only, and the copy is counted once
    per epoch (by the rank owning its shard) with verify's message."""
    d = build(tmp_path, "duplicate_key_in_two_shards")
    copy_key = episodes()[1].key
    keys, counts = [], []
    with caplog.at_level(logging.WARNING):
        for rank in range(2):  # 2 ranks x 1 slot: rank r reads only shard r
            loader = build_loader(reader_cfg(d), TinyTextTokenizer(), rank=rank, world_size=2)
            with deadline():
                keys.append({k for b in itertools.islice(loader, 6) for k in b.meta["key"]})
            counts.append(loader.skip_counts()["duplicate_episode"])
    assert copy_key in keys[0] and copy_key not in keys[1], keys  # shard 1's copy is never read
    assert keys[1] == {episodes()[3].key, episodes()[5].key}
    assert counts[0] == 0 and counts[1] >= 1, counts
    assert "1 episode keys are in more than one shard" in caplog.text


def test_shard_of_copies_only_is_not_read(tmp_path, caplog):
    """A shard listed twice under another name (all its keys repeated) is dropped at start: a slot that
    owned only it would otherwise find no episode at all."""
    d = write(tmp_path / "s")
    shutil.copy(d / "shard-000000.tar", d / "shard-000002.tar")

    def add_copy(m):
        m["shards"].append(dict(m["shards"][0], path="shard-000002.tar"))
    edit_json(d / "manifest.json", add_copy)
    lists = json.loads((d / "episode_keys.json").read_text())["shards"]
    lists["shard-000002.tar"] = lists["shard-000000.tar"]
    from megavla.data_shards.manifest import encode_episode_keys
    data, entry = encode_episode_keys(lists)
    (d / "episode_keys.json").write_bytes(data)
    edit_json(d / "manifest.json", lambda m: m.__setitem__("episode_keys", entry))
    with caplog.at_level(logging.WARNING):
        outcome, keys, _, _ = run_reader(d)
    assert outcome == "read" and keys == {e.key for e in episodes()}
    assert "all 3 episodes of shard-000002.tar are copies" in caplog.text
    code, text = run_verify(d)
    assert code == 1 and text.count("episode key also in shard-000000.tar") == 3


def test_set_without_key_list_loads_with_one_warning(tmp_path, caplog):
    d = build(tmp_path, "clean")
    no_key_list(d)
    with caplog.at_level(logging.WARNING):
        outcome, keys, _, _ = run_reader(d)
    assert outcome == "read" and keys == {e.key for e in episodes()}
    warnings = [r.getMessage() for r in caplog.records if "no 'episode_keys'" in r.getMessage()]
    assert len(warnings) == 1 and "cannot be checked" in warnings[0]
    assert run_verify(d)[0] == 0


def test_damaged_key_list_refuses_the_set(tmp_path):
    d = build(tmp_path, "clean")
    (d / "episode_keys.json").write_text('{"format_version": 1, "shards": {}}')
    outcome, _, _, message = run_reader(d)
    assert outcome == "refuse" and "episode_keys.json: sha256 differs" in message
    code, text = run_verify(d)
    assert code == 1 and "episode_keys.json: sha256 differs" in text


def test_verify_finds_a_shard_whose_keys_are_not_its_list(tmp_path):
    """A shard replaced by another (same name) defeats the start check; verify names it."""
    d = build(tmp_path, "clean")
    shutil.copy(d / "shard-000000.tar", d / "shard-000001.tar")
    code, text = run_verify(d)
    assert code == 1 and "episode keys differ from its list in episode_keys.json" not in text  # sha first
    edit_json(d / "manifest.json", lambda m: m["shards"][1].update(
        {k: m["shards"][0][k] for k in ("bytes", "sha256", "steps", "embodiments")}))
    code, text = run_verify(d)
    assert code == 1 and "episode keys differ from its list in episode_keys.json" in text


def test_fifo_norm_stats_and_manifest_do_not_block(tmp_path):
    d = write(tmp_path / "s")
    (d / "norm_stats.json").unlink()
    os.mkfifo(d / "norm_stats.json")
    outcome, _, _, message = run_reader(d)
    assert outcome == "refuse" and "not a regular file but a FIFO" in message
    (d / "manifest.json").unlink()
    os.mkfifo(d / "manifest.json")
    outcome, _, _, message = run_reader(d)
    assert outcome == "refuse" and "manifest.json: cannot be read" in message and "FIFO" in message
    code, text = run_verify(d)
    assert code == 1


def test_fail_mode_raises_on_every_skip_case(tmp_path):
    for case in ("fifo_shard", "absurd_action_3e38", "zero_step_episode", "duplicate_key_in_one_shard",
                 "duplicate_key_in_two_shards"):
        outcome, _, _, message = run_reader(build(tmp_path, case), on_bad_sample="fail")
        assert outcome == "refuse" and "data.on_bad_sample=fail" in message, (case, message)


def test_max_abs_normalized_is_configurable(tmp_path):
    d = build(tmp_path, "absurd_action_3e38")
    big = make_episode(0, 1, 0, steps=6)
    big.actions[2, 1] = 50.0  # ~50x the data's spread: beyond a bound of 10, inside the default
    d2 = write(tmp_path / "moderate", lambda s, e: s.__setitem__(1, episode_to_sample(big)))
    assert run_reader(d2)[0] == "read"
    assert run_reader(d2, max_abs_normalized=10.0)[0] == "skip:bad_sample"
    assert run_reader(d)[0] == "skip:bad_sample"


@pytest.mark.parametrize("workers", [0, 2])
def test_tokenizer_errors_are_counted_skips(tmp_path, caplog, workers):
    """Whatever a tokenizer library raises on one sample is a counted skip, never a worker crash."""
    class PickyTokenizer(TinyTextTokenizer):
        def encode(self, text, add_bos=True, add_eos=False):
            if "task 2" in text:
                raise RuntimeError("library refuses this text")
            return super().encode(text, add_bos, add_eos)

    d = write(tmp_path / "s")
    loader = build_loader(reader_cfg(d, num_workers=workers), PickyTokenizer())
    with deadline(), caplog.at_level(logging.WARNING):
        keys = {k for b in itertools.islice(loader, 12) for k in b.meta["key"]}
    assert loader.skip_counts()["bad_sample"] >= 1
    assert workers or "library refuses this text" in caplog.text  # worker logs do not reach caplog
    assert not any("_t0002_" in k for k in keys)


def test_verify_on_a_file_says_what_it_is(tmp_path, caplog):
    d = write(tmp_path / "s")
    with caplog.at_level(logging.ERROR):
        assert data_cli(["verify", str(d / "manifest.json"), "--no-progress"]) == 2
    assert "is a regular file, not a shard set" in caplog.text and f"its directory {d} may be the set" in caplog.text
    assert "no such directory" not in caplog.text


def test_zero_frame_human_episode_says_empty():
    from megavla.data_shards.hands import hands_to_actions
    with pytest.raises(ValueError, match=r"the episode is empty \(0 frames\)"):
        hands_to_actions(np.zeros((0, 2, 17, 3)), np.zeros((0, 4, 4)))


def test_collate_refuses_non_finite_values():
    from megavla.data.collate import NonFiniteBatchError, build_sample, collate_samples
    ep = make_episode(0, 0, 0, steps=6)
    kw = dict(source="s", where="w", cameras=["head"], image_size=16, chunk_length=3, max_state_dim=5,
              max_action_dim=6, normalizer=None)
    good = build_sample(ep, 0, **kw)
    bad = build_sample(ep, 1, **kw)
    bad["actions"][0, 0] = np.nan
    collate_samples([good])
    with pytest.raises(NonFiniteBatchError, match=ep.key):
        collate_samples([good, bad])


def test_non_square_frames_are_letterboxed_not_stretched():
    import simplejpeg
    from megavla.data.collate import decode_frame
    img = np.full((16, 32, 3), 200, np.uint8)  # 32 wide, 16 high
    out = decode_frame(simplejpeg.encode_jpeg(img, quality=95), 16, "w")
    assert out.shape == (16, 16, 3)
    assert out[:4].max() == 0 and out[-4:].max() == 0  # zero bands above and below
    assert abs(int(out[8, 8, 0]) - 200) < 8  # the image itself, scaled to 16 x 8


def test_counters_name_what_they_count(tmp_path):
    loader = build_loader(reader_cfg(write(tmp_path / "s")), TinyTextTokenizer())
    list(itertools.islice(loader, 3))
    assert loader.read_counts() == {"episodes_read": 6, "samples_read": 12}  # a window of 4 is 2 episodes
    skips = loader.skip_counts()
    assert set(skips) == {"bad_shard", "bad_sample", "bad_image", "duplicate_episode", "excluded_episode",
                          "unused_frame"}
    assert not any(skips.values())


def test_bad_shard_counted_once_per_epoch_not_per_reader(tmp_path):
    """2 shards, 4 worker slots: every slot reads both shards, but only the owner of the bad one
    (slot 1: shards[slot::slots]) counts it, once per epoch (each epoch draws each shard once)."""
    from megavla.data.pipeline import WorkerStream
    d = build(tmp_path, "fifo_shard")
    plan = build_loader(reader_cfg(d, num_workers=4), TinyTextTokenizer()).plan
    counts, epochs = [], []
    for worker in range(4):
        stream = WorkerStream(plan, worker)
        with deadline():
            list(itertools.islice(stream.batches(), 5))  # 20 samples = 10 episodes = 3+ epochs
        counts.append(stream.counters.values["bad_shard"])
        epochs.append(stream.cursors["robot"].draw // 2)  # epochs whose both draws are done
    assert counts[0] == counts[2] == counts[3] == 0, counts
    assert epochs[1] <= counts[1] <= epochs[1] + 1 and epochs[1] >= 3, (counts, epochs)


def test_verify_limits_follow_the_reader_settings(tmp_path):
    from megavla.data_shards.validate import ReadLimits
    defaults = DataConfig()
    assert ReadLimits.from_config(defaults) == ReadLimits()  # verify's defaults are the reader's
    big = make_episode(0, 1, 0, steps=6)
    big.actions[2, 1] = 50.0
    d = write(tmp_path / "moderate", lambda s, e: s.__setitem__(1, episode_to_sample(big)))
    assert run_verify(d)[0] == 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert data_cli(["verify", str(d), "--no-progress", "--max-abs-normalized", "10"]) == 1
    assert "beyond +-10 " in out.getvalue()


def test_normalizer_refuses_bad_stats_from_a_checkpoint():
    from megavla.data.normalize import Normalizer, NormStatsError
    from helpers.shard_sets import norm_stats_of
    stats = norm_stats_of([make_episode(0, 0, 0)])
    stats["robot/arm"]["state"]["std"][0] = float("inf")
    with pytest.raises(NormStatsError, match=r"robot/arm.state.std is not finite in dims \[0\]"):
        Normalizer(stats)


def test_train_refuses_a_bad_set_before_any_process(tmp_path, capsys):
    """NaN stats once trained to loss nan, exited 0 and saved a checkpoint: now `megavla train`
    stops at the per-set check, exit 2, nothing written."""
    from megavla.train.cli import main as train_main
    d = build(tmp_path, "nan_in_norm_stats")
    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    code = train_main([str(config), f"data.sources.robot={d}", f"train.run_dir={tmp_path / 'run'}", "--nproc", "2"])
    assert code == 2 and "robot/arm.actions.q99 is not finite" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    d = build(tmp_path, "duplicate_key_in_two_shards")  # refused only when skips are refused
    code = train_main([str(config), f"data.sources.robot={d}", f"train.run_dir={tmp_path / 'run'}", "--nproc", "2",
                       "data.on_bad_sample=fail"])
    assert code == 2 and "episode key also in shard-000000.tar" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_inspect_and_stats_name_a_fifo_shard(tmp_path, caplog):
    d = build(tmp_path, "fifo_shard")
    for command in (["inspect", str(d)], ["stats", str(d), "--no-progress"]):
        out = io.StringIO()
        with deadline(), contextlib.redirect_stdout(out), caplog.at_level(logging.WARNING):
            assert data_cli(command) == 1, command
        assert "not a regular file but a FIFO" in out.getvalue() + caplog.text, command


def test_loader_state_with_old_counter_names_resumes(tmp_path):
    """States saved before the rename hold "episodes"/"samples": restored as *_read, not lost."""
    cfg = reader_cfg(write(tmp_path / "s"))
    loader = build_loader(cfg, TinyTextTokenizer())
    list(itertools.islice(loader, 3))
    state = loader.state_dict()
    before = loader.read_counts()
    for worker in state["workers"]:
        worker["counters"]["episodes"] = worker["counters"].pop("episodes_read")
        worker["counters"]["samples"] = worker["counters"].pop("samples_read")
    restored = build_loader(cfg, TinyTextTokenizer())
    restored.load_state_dict(state)
    list(itertools.islice(restored, 1))
    after = restored.read_counts()
    assert after["samples_read"] == before["samples_read"] + 4 and after["episodes_read"] >= before["episodes_read"]
    assert "episodes" not in restored.skip_counts() and "samples" not in restored.skip_counts()


def test_manifest_that_is_not_an_object_is_refused_by_name(tmp_path):
    # Was: AttributeError "'list' object has no attribute 'get'" in the reader, verify and inspect.
    d = write(tmp_path / "s")
    manifest = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps([manifest]))
    outcome, _, _, message = run_reader(d)
    assert outcome == "refuse" and "manifest.json: a JSON list, not an object" in message, message
    manifest["shards"] = [7]
    (d / "manifest.json").write_text(json.dumps(manifest))
    outcome, _, _, message = run_reader(d)
    assert outcome == "refuse" and "shards[0] must be an object" in message, message
    code, text = run_verify(d)
    assert code == 1 and "shards[0] must be an object" in text, text
