"""Harness regression: the scripted expert as a chunked policy through normalize -> FAST encode/decode
-> unnormalize -> first-k-of-H execution must succeed ~always through closed_loop.evaluate. If it
does not, chunking / normalization / tokenization / termination are broken, not the model."""
import numpy as np
import pytest

from helpers.norm_stats import robot_arm_norm_stats
from megavla.data.normalize import Normalizer
from megavla.data_shards.synth import generate_episode
from megavla.eval import closed_loop as cl
from megavla.tokenizers.pair import CorpusCounts, episode_chunks
from megavla.tokenizers.fast import train_fast_tokenizer

COMBOS = ["0:0", "0:1", "0:2", "1:3", "2:4", "3:5"]  # pick-place, push, pick and more


@pytest.fixture(scope="module")
def round_trip():
    episodes = [generate_episode("robot/arm", *cl.parse_combo(c), e, image_size=16) for c in COMBOS for e in range(2)]
    normalizer = Normalizer(robot_arm_norm_stats(episodes), "quantile")
    chunks = [chunk for ep in episodes for chunk in episode_chunks(
        normalizer.normalize(ep.actions, "robot/arm"), ep.action_mask, ep.step_valid, 10, 1, CorpusCounts())]
    return normalizer, train_fast_tokenizer(chunks, vocab_size=512)


def test_oracle_chunk_policy_through_the_full_round_trip_succeeds(round_trip):
    normalizer, fast = round_trip
    policy = cl.OracleChunkPolicy(chunk_length=10, execute_k=5, normalizer=normalizer, fast_tokenizer=fast)
    result = cl.evaluate(policy, COMBOS, 4, image_size=32, progress=False)
    assert result["episodes"] == 24
    assert result["successes"] >= 23, result["per_combo"]  # ~always; one miss allowed for FAST rounding


def test_oracle_chunk_policy_plain_and_one_step_chunks_succeed():
    for H, k in ((10, 5), (4, 4), (1, 1)):
        result = cl.evaluate(cl.OracleChunkPolicy(H, k), COMBOS, 2, image_size=32, progress=False)
        assert result["success_rate"] == 1.0, (H, k, result["per_combo"])


def test_oracle_detects_a_broken_transform():
    """The regression test can fail: an unnormalize that drops the scale breaks the oracle."""
    class Broken(Normalizer):
        def unnormalize(self, y, embodiment, kind="actions"):
            return np.asarray(y) * 0.1
    episodes = [generate_episode("robot/arm", 0, 0, 0, image_size=16)]
    policy = cl.OracleChunkPolicy(10, 5, normalizer=Broken(robot_arm_norm_stats(episodes), "quantile"))
    assert cl.evaluate(policy, ["0:0", "0:1"], 2, image_size=32, progress=False)["success_rate"] == 0.0


def test_oracle_rejects_bad_settings():
    with pytest.raises(ValueError, match="execute_k"):
        cl.OracleChunkPolicy(4, 5)
    with pytest.raises(ValueError, match="normalizer"):
        cl.OracleChunkPolicy(10, 5, fast_tokenizer=object())
