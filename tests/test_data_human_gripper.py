"""data.human_gripper: closure supervises the human gripper dims with the hand's closure estimate and
changes nothing else: robot samples and every other dim are bit-identical to the default (masked)."""
import itertools

import numpy as np
import pytest

from megavla.config import ConfigError, build
from megavla.config.data import DataConfig
from megavla.data_shards import hands
from megavla.data.pipeline import build_loader
from megavla.data_shards.synth import generate_episode
from megavla.data_shards.writer import ShardSetWriter
from megavla.eval.closed_loop import parse_combo


class ChunkTokens:  # a FAST stand-in: the chunk's values, so token changes track target changes
    def encode(self, chunk):
        return [int(v) for v in np.clip(np.round(np.asarray(chunk)[::3].ravel() * 8) + 20, 0, 40)]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("grip")
    out = {}
    for name, emb, combos in (("robot", "robot/arm", ["0:3", "0:4"]), ("human", "human/ego", ["0:0", "0:2"])):
        with ShardSetWriter(root / name, target_shard_bytes=2**20, generator={"test": name}) as writer:
            for combo in combos:
                for e in range(2):
                    writer.write(generate_episode(emb, *parse_combo(combo), e, image_size=16, cameras=("head",)))
        out[name] = str(root / name)
    return out


def batches(sets, mode, n=6):
    cfg = DataConfig(sources=sets, image_size=16, cameras=["head"], batch_size=8, num_workers=0, chunk_length=4,
                     shuffle_buffer=8, samples_per_episode=4, human_gripper=mode)
    loader = build_loader(cfg, None, ChunkTokens())
    return loader, list(itertools.islice(loader, n))


def test_closure_changes_only_the_human_gripper_mask_and_targets(sets):
    _, masked = batches(sets, "masked")
    loader, closure = batches(sets, "closure")
    human_id = 1  # EMBODIMENT_IDS["human/ego"]
    grip = list(hands.GRIPPER_DIMS)
    other = [d for d in range(masked[0].actions.shape[-1]) if d not in grip]
    seen_human = 0
    for a, b in zip(masked, closure):
        human = (a.embodiment == human_id).numpy()
        assert np.array_equal(a.embodiment.numpy(), b.embodiment.numpy())  # the same samples, same order
        for name in ("images", "state", "state_mask", "text_tokens", "action_time_mask"):
            assert np.array_equal(getattr(a, name).numpy(), getattr(b, name).numpy()), name
        # robot samples: every field bit-identical, FAST tokens included
        for name in ("actions", "action_dim_mask"):
            assert np.array_equal(getattr(a, name).numpy()[~human], getattr(b, name).numpy()[~human]), name
        assert np.array_equal(a.fast_tokens.numpy()[~human][:, :a.fast_tokens.shape[1]],
                              b.fast_tokens.numpy()[~human][:, :a.fast_tokens.shape[1]])
        # human samples: non-gripper dims identical; gripper dims now supervised and set
        assert np.array_equal(a.actions.numpy()[human][..., other], b.actions.numpy()[human][..., other])
        assert np.array_equal(a.action_dim_mask.numpy()[human][:, other], b.action_dim_mask.numpy()[human][:, other])
        assert not a.action_dim_mask.numpy()[human][:, grip].any()
        assert b.action_dim_mask.numpy()[human][:, grip].all()
        seen_human += int(human.sum())
    assert seen_human > 0
    # The targets are the closure estimate on the gripper convention's scale: [0, 1] -> [-1, 1].
    ep = generate_episode("human/ego", 0, 0, 0, image_size=16, cameras=("head",))
    closure = hands.grip_closure(ep.hand_keypoints)
    expected = np.concatenate([closure[1:], closure[-1:]])
    normalized = loader.normalizer.normalize(ep.actions.astype(np.float32), "human/ego")
    from megavla.data.collate import human_gripper_supervision
    actions, mask = human_gripper_supervision(ep)
    np.testing.assert_allclose(actions[:, grip], expected, atol=1e-6)
    np.testing.assert_allclose(loader.normalizer.normalize(actions, "human/ego")[:, grip], 2 * expected - 1, atol=1e-5)
    rest = [d for d in range(hands.HUMAN_ACTION_DIM) if d not in grip]
    assert mask.all() and np.array_equal(normalized[:, rest], loader.normalizer.normalize(actions, "human/ego")[:, rest])
    # The loader's stats (saved with checkpoints) say so; the robot's stats are untouched.
    assert loader.norm_stats["human/ego"]["actions"]["q99"][grip[0]] == 1.0
    masked_loader, _ = batches(sets, "masked", n=0)
    assert loader.norm_stats["robot/arm"] == masked_loader.norm_stats["robot/arm"]


def test_human_gripper_values_are_checked():
    assert DataConfig().human_gripper == "masked"  # the paper's default
    with pytest.raises(ConfigError):
        build(DataConfig, {"human_gripper": "open"})


def test_closure_estimate_reads_the_hand_the_world_drew():
    """The closure target must say open where the hand is open: the first estimate read 0.61 for the
    mini-world's open hand (past the 0.5 at which a gripper counts as closed), so the closure arm taught
    "closed" throughout. Tracked (noisy) keypoints vs the true gripper over pick, push and place tasks."""
    from megavla.data_shards.miniworld import hand_keypoints
    from megavla.data_shards.synth import TRACKER_NOISE, episode_rng, rollout
    for hand in hands.HANDS:
        assert hands.grip_closure(hand_keypoints(np.eye(4), 0.0, hand, 1.0)) < 0.05
        assert hands.grip_closure(hand_keypoints(np.eye(4), 1.0, hand, 1.0)) > 0.95
    agree = []
    for task in range(6):
        ro = rollout("human/ego", 0, task, episode_rng("human/ego", 0, task, 0, 0), image_size=16, cameras=("head",))
        tracked = ro.keypoints + np.random.default_rng(task).normal(0.0, TRACKER_NOISE, ro.keypoints.shape)
        closure = hands.grip_closure(tracked)  # [T, 2]
        true = ro.states[:, [hands.ARM_STATE_DIM - 1, 2 * hands.ARM_STATE_DIM - 1]]
        agree.append(((closure >= 0.5) == (true >= 0.5)).mean())
        if task == 0:  # a pick-place: the hand closes and opens again
            assert (true[:, 0] >= 0.5).any() and (closure[:, 0] >= 0.5).any() and (closure[:, 0] < 0.5).any()
    assert min(agree) >= 0.95, agree
