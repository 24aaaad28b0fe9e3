"""model.state_mode=text (a loaded π0.5): every sample's prompt is pi05_prompt(instruction, state of its
own timestep), built by one function (data.prompt.prompt_tokens) in training batches and in inference
(eval.policy.episode_sample, which the closed-loop evaluator and the policy server call); other state
modes keep the per-text token cache and their exact tokens; config checks refuse a run that cannot
hold the prompt; a 2-step `megavla train` on the tiny preset runs with it."""
from __future__ import annotations

import dataclasses
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
from helpers.shard_sets import TinyTextTokenizer, make_episode, norm_stats_of, write_shard_set

from megavla.config import ConfigError, load_config
from megavla.config.checks import check_config, state_prompt_problems
from megavla.config.data import DataConfig
from megavla.data.collate import BatchFields, episode_arrays, sample_fields
from megavla.data.normalize import Normalizer
from megavla.data.pipeline import build_loader
from megavla.eval.policy import LoadedCheckpoint, collate, episode_sample, frames_episode
from megavla.tokenizers.text import TextTokenizer, train_text_tokenizer

REPO = Path(__file__).resolve().parents[1]
H, MAX_S, MAX_A = 5, 6, 7
CAMERAS = ["head", "left_wrist", "right_wrist"]


def lerobot_bins(state: np.ndarray) -> list[int]:
    """π0.5's 256 bins over [-1, 1] written out: np.digitize(x, linspace(-1, 1, 257)[:-1]) - 1 is
    floor((x + 1) * 128), -1 below -1 and 255 from the last edge up (no clipping of the state)."""
    return np.clip(np.floor((state.astype(np.float64) + 1.0) * 128.0), -1, 255).astype(int).tolist()


def expected_prompt(ep, t: int, normalizer: Normalizer) -> str:
    """Written here from the definition, not with data.prompt.pi05_prompt: normalized, zero-padded
    to max_state_dim (LeRobot pads before binning), binned, in LeRobot's template."""
    state = np.zeros(MAX_S, np.float32)
    state[: ep.state.shape[1]] = normalizer.normalize(ep.state, ep.embodiment, "state")[t]
    task = ep.instruction.strip().replace("_", " ").replace("\n", " ")
    return f"Task: {task}, State: {' '.join(map(str, lerobot_bins(state)))};\nAction: "


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("state_prompt")
    robot = [make_episode(s, t, 0, steps=9) for s in range(2) for t in range(2)]
    corpus = [e.instruction for e in robot] * 10 + ["Task: State: Action: 0 1 2 3 4 5 6 7 8 9 - ; ,"] * 10
    tok = train_text_tokenizer(corpus, root / "text.model", vocab_size=320)
    directory = write_shard_set(root / "robot", robot, per_shard=2)
    cfg = DataConfig(sources={"robot": str(directory)}, image_size=16, batch_size=5, num_workers=0,
                     chunk_length=H, max_action_dim=MAX_A, max_state_dim=MAX_S, shuffle_buffer=5,
                     samples_per_episode=3, normalization="quantile")
    return {"episodes": {e.key: e for e in robot}, "tok": tok, "cfg": cfg}


def _rows(batch):
    for i, (key, t) in enumerate(zip(batch.meta["key"], batch.meta["timestep"])):
        yield i, key, t, batch.text_tokens[i][batch.text_mask[i]].tolist()


def test_training_batches_hold_the_prompt_of_each_samples_own_timestep(data):
    tok, by_key = data["tok"], data["episodes"]
    loader = build_loader(data["cfg"], tok, None, state_mode="text")
    prompts_seen = set()
    for batch in itertools.islice(loader, 4):
        for _, key, t, tokens in _rows(batch):
            want = expected_prompt(by_key[key], t, loader.normalizer)
            assert tokens == tok.encode(want, add_bos=True, add_eos=False), (key, t)
            assert want.endswith(" 128 128;\nAction: ")   # the two padded dims: a normalized 0
            prompts_seen.add(want)
    assert len(prompts_seen) > 8     # one prompt per (episode, timestep), not one per episode
    # A loader worker process (the plan travels to it; token columns come back in its arena).
    worker_cfg = dataclasses.replace(data["cfg"], num_workers=1)
    for _, key, t, tokens in _rows(next(iter(build_loader(worker_cfg, tok, None, state_mode="text")))):
        assert tokens == tok.encode(expected_prompt(by_key[key], t, loader.normalizer)), (key, t)
    # Before: build_loader took no state_mode and every row held the instruction only.
    plain = next(iter(build_loader(data["cfg"], tok, None)))
    for _, key, _, tokens in _rows(plain):
        assert tokens == tok.encode(by_key[key].instruction, add_bos=True, add_eos=False)


def test_inference_on_the_same_observation_gives_the_training_tokens(data):
    """The observation of a training sample (frames, raw state, instruction) through the path the
    closed-loop evaluator and the server take: frames_episode -> episode_sample -> collate."""
    tok, by_key = data["tok"], data["episodes"]
    loader = build_loader(data["cfg"], tok, None, state_mode="text")
    full = load_config(None, ["model.preset=tiny", "model.state_mode=text", f"data.chunk_length={H}",
                              f"data.max_action_dim={MAX_A}", f"data.max_state_dim={MAX_S}", "data.image_size=16"])
    loaded = LoadedCheckpoint(None, full, loader.normalizer, tok, None, Path("."), 0)
    for batch in itertools.islice(loader, 2):
        for i, key, t, tokens in _rows(batch):
            ep = by_key[key]
            images = {cam: simplejpeg.decode_jpeg(ep.frames[cam][t]) for cam in ep.frames}
            obs = frames_episode(ep.embodiment, ep.instruction, ep.state[t], images, ep.actions.shape[1])
            served = collate(loaded, [episode_sample(loaded, obs, 0)])
            assert served.text_tokens[0][served.text_mask[0]].tolist() == tokens, (key, t)
            assert torch.equal(served.state[0], batch.state[i])


@pytest.mark.parametrize("mode", [None, "discrete", "continuous"])
def test_other_state_modes_keep_the_cached_instruction_tokens(mode):
    """Bit-identical to before (tests/test_pipeline_sample_equivalence.py pins the default against
    its reference): the instruction tokens, tokenized once per text, in sample_fields and BatchFields."""
    eps = [make_episode(0, 0, 0, steps=7), make_episode(1, 1, 0, human=True, steps=6)]
    normalizer, tok = Normalizer(norm_stats_of(eps), "quantile"), TinyTextTokenizer()
    cache: dict = {}
    rows = BatchFields(13, H, MAX_S, MAX_A, 3, text_tokenizer=tok, token_cache=cache, state_mode=mode)
    for ep in eps:
        arrays = episode_arrays(ep, {}, normalizer, H, MAX_S, MAX_A)
        for t in range(ep.num_steps):
            got = sample_fields(ep, t, source="s", where="w", chunk_length=H, max_state_dim=MAX_S,
                                max_action_dim=MAX_A, normalizer=normalizer, text_tokenizer=tok,
                                text_cache={}, state_mode=mode)
            assert got["text_tokens"] == tok.encode(ep.instruction, add_bos=True, add_eos=False)
            rows.add(ep, t, arrays, source="s", where="w", image_mask=np.ones(3, bool), fast_tokens=[])
    assert [k for k in cache if k[0] == "instruction"] == [("instruction", e.instruction) for e in eps]
    batch = rows.batch(torch.zeros(13, 3, 4, 4, 3, dtype=torch.uint8))
    assert all(tokens == tok.encode(by.instruction) for (_, _, _, tokens), by in
               zip(_rows(batch), [eps[0]] * 7 + [eps[1]] * 6))
    with pytest.raises(ValueError, match="state_mode='texts'"):
        BatchFields(1, H, MAX_S, MAX_A, 3, state_mode="texts")


def _cfg(*overrides):
    return load_config(REPO / "configs" / "demo.yaml", ["model.state_mode=text", *overrides])


def test_config_checks_name_the_key_a_text_prompt_needs(data, tmp_path):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    data["tok"].save(tok_dir / "text.model")
    keys = [p.key for p in state_prompt_problems(_cfg())]
    assert keys == ["train.tokenizer_dir"]
    short = _cfg(f"train.tokenizer_dir={tok_dir}")       # model.text_len=48 (default)
    problems = state_prompt_problems(short)
    assert [p.key for p in problems] == ["model.text_len"]
    least = int(re.search(r"already (\d+) tokens", problems[0].message).group(1))
    tok = TextTokenizer.load(tok_dir / "text.model")
    assert least == len(tok.encode("Task: , State: " + " ".join(["128"] * 32) + ";\nAction: "))
    with pytest.raises(ConfigError, match="model.text_len=48"):
        check_config(short)
    assert state_prompt_problems(_cfg(f"train.tokenizer_dir={tok_dir}", f"model.text_len={least}")) == []
    none = _cfg(f"train.tokenizer_dir={tok_dir}", "model.text_len=400", "data.normalization=none")
    assert [p.key for p in state_prompt_problems(none)] == ["data.normalization"]
    assert state_prompt_problems(load_config(REPO / "configs" / "demo.yaml")) == []   # tiny: continuous


def test_two_step_train_on_the_tiny_preset_with_state_mode_text(tiny_synth_data, tmp_path):
    root = tmp_path
    shards, tok = tiny_synth_data / "shards", tiny_synth_data / "tok"
    argv = [str(REPO / "configs" / "demo.yaml"), f"data.sources.robot={shards / 'robot'}",
            f"data.sources.human={shards / 'human'}", f"train.tokenizer_dir={tok}",
            f"train.run_dir={root / 'run'}", "train.steps=2", "train.log_every=1", "train.warmup_steps=1",
            "train.progress=false", "data.num_workers=0", "data.batch_size=2", "model.state_mode=text",
            "--nproc", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    train = [sys.executable, "-m", "megavla.cli", "train"]
    refused = subprocess.run(train + argv, capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode == 2 and "model.text_len=48" in refused.stderr, refused.stderr[-2000:]
    assert not (root / "run" / "checkpoints").exists()
    done = subprocess.run(train + argv + ["model.text_len=400"], capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training done:" in done.stdout and "steps:           2" in done.stdout, done.stdout

    # The checkpoint serves with the state in its prompt (the saved config's state_mode) and acts.
    from megavla.eval.policy import episode_batch, load_checkpoint
    loaded = load_checkpoint(root / "run")
    assert loaded.model.cfg.state_mode == "text" and loaded.model.state_embed is None
    S, A = loaded.normalizer.dim("robot/arm", "state"), loaded.normalizer.dim("robot/arm", "actions")
    state = np.linspace(-1, 1, S).astype(np.float32)
    obs = frames_episode("robot/arm", "pick up the cube", state, {"head": np.zeros((32, 32, 3), np.uint8)}, A)
    batch = episode_batch(loaded, [(obs, 0)])
    text = loaded.text_tokenizer.decode(batch.text_tokens[0][batch.text_mask[0]].tolist())
    normalized = loaded.normalizer.normalize(state, "robot/arm", "state")
    assert text.startswith(f"Task: pick up the cube, State: {' '.join(map(str, lerobot_bins(normalized)))} 128"), text
    actions = loaded.model.sample_actions(batch, num_steps=2, noise=torch.zeros(1, 10, 32))
    assert actions.shape == (1, 10, 32) and torch.isfinite(actions).all()
