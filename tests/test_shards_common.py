"""The toy episodes the shard tests share (tests/helpers/toy_episodes.py) are deterministic and distinct."""
from __future__ import annotations

import numpy as np

from helpers.toy_episodes import make_episode


def test_toy_episodes_are_deterministic_and_distinct():
    a, b = make_episode(seed=1), make_episode(seed=1)
    assert np.array_equal(a.actions, b.actions) and a.frames == b.frames
    assert not np.array_equal(a.actions, make_episode(seed=2).actions)
