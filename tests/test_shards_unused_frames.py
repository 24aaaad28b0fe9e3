"""JPEG members an episode does not use (issue 24 item 8): frame t >= the episode's steps, or frames of a
camera its meta.json does not list. `verify` warns naming the shard, episode and members; the reader
counts them (``unused_frame``, once per member per set) and reads the episode as it is. Before, both
ignored them without a word (verify: "OK", reader: no count)."""
from __future__ import annotations

import json
import logging

from helpers.damaged_shards import episodes, run_reader, run_verify, write

from megavla.data.member_index import episode_templates
from megavla.data_shards.tar_reader import READ, REF, iter_tar_members, map_shard
from megavla.data_shards.format import sample_to_episode
from megavla.data_shards.validate import unused_frame_members


def _extra_frames(samples, eps):
    """Episode 0 (6 steps): frames 6 and 7 of head. Episode 1: right_wrist marked absent in meta.json
    while its 6 frames stay in the tar."""
    samples[0]["head.0006.jpg"] = samples[0]["head.0007.jpg"] = samples[0]["head.0005.jpg"]
    meta = json.loads(samples[1]["meta.json"])
    meta["cameras"]["right_wrist"] = False
    samples[1]["meta.json"] = json.dumps(meta).encode()


def test_verify_warns_and_the_reader_counts_once_per_member(tmp_path, caplog):
    d = write(tmp_path / "set", _extra_frames)
    eps = episodes()
    code, out = run_verify(d)
    assert code == 0, out  # a warning: every episode is still read
    warnings = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 2, out
    assert ": OK (2 warnings above)" in out.splitlines()[-1], out   # the verdict line says so too
    shard = str(d / "shard-000000.tar")
    assert warnings[0].startswith(f"WARNING {shard} key={eps[0].key} member=head.0006.jpg: ")
    assert "2 JPEG member(s) not part of the episode (6 steps" in warnings[0]
    assert "head.0006.jpg, head.0007.jpg; ignored" in warnings[0]
    assert f"key={eps[1].key}" in warnings[1] and "6 JPEG member(s)" in warnings[1]
    assert "right_wrist.0000.jpg, right_wrist.0001.jpg" in warnings[1]

    with caplog.at_level(logging.WARNING):
        outcome, keys, skips, _ = run_reader(d, batches=12)  # 24 episode reads: 4 epochs of 6
    assert outcome == "skip:unused_frame" and keys == {e.key for e in eps}
    assert skips == {"unused_frame": 8}  # 2 + 6 members, not once more per epoch
    for line in warnings:  # the reader logs verify's message verbatim
        assert line.split(": ", 1)[1] in caplog.text
    assert "[unused_frame so far: 8]" in caplog.text


def test_fail_mode_still_reads_the_episode(tmp_path):
    d = write(tmp_path / "set", _extra_frames)
    outcome, keys, skips, refusal = run_reader(d, batches=4, on_bad_sample="fail")
    assert outcome == "skip:unused_frame" and not refusal and len(keys) >= 4


def test_remembered_walk_sees_frames_past_the_steps(tmp_path):
    """Later epochs build samples from member_index templates, where a camera's frames are one
    sequence that may run past the steps (sample_to_episode slices it): still found there."""
    d = write(tmp_path / "set", _extra_frames)
    path = str(d / "shard-000000.tar")
    index: list = []
    mode = lambda key, suffix: REF if suffix.endswith(".jpg") else READ  # noqa: E731
    list(iter_tar_members(map_shard(path), path, mode, index))
    templates = episode_templates(index)
    found = []
    for template in templates:
        sample = template.sample(map_shard(path), path)
        found.append(unused_frame_members(sample, sample_to_episode(sample, where=path)))
    assert "__frames__" in templates[0].sample(map_shard(path), path)
    assert found == [["head.0006.jpg", "head.0007.jpg"], [f"right_wrist.{t:04d}.jpg" for t in range(6)], []]


def test_clean_set_has_none(tmp_path):
    d = write(tmp_path / "set")
    code, out = run_verify(d)
    assert code == 0 and "WARNING" not in out and out.splitlines()[-1].endswith(": OK"), out
    assert run_reader(d, batches=6)[2] == {}
