"""PaliGemma weights into a model built under DeepSpeed's zero.Init (ZeRO-3, `train.pretrained`): each
checkpoint tensor is gathered, written and re-partitioned in turn, and the result equals loading into
a plain model -- on 1 rank here and on 2 ranks (gloo) in a spawned process group."""
from __future__ import annotations

import deepspeed
import pytest
import torch
import torch.multiprocessing as mp

from megavla.config import load_config
from megavla.config.core import ConfigError
from megavla.model.pretrained import load_paligemma, paligemma_size_overrides
from megavla.train.engine import (build_partitioned, free_port, init_distributed, seed_everything,
                                  shutdown_distributed)
from megavla.train.entry import default_model_factory

transformers = pytest.importorskip("transformers")  # test-only dependency (extras "test")
from helpers.tiny_models import TEXT_VOCAB, tiny_paligemma  # noqa: E402


def _config(path, world: int = 1):
    sizes = dict(paligemma_size_overrides(path), text_vocab_size=TEXT_VOCAB, fast_vocab_size=16)
    return load_config(None, ["model.preset=tiny", "model.kernels=torch", "train.zero_stage=3",
                              "train.precision=fp32", f"train.pretrained={path}"]
                       + [f"model.{k}={v}" for k, v in sizes.items()])


def _plain_loaded(cfg):
    seed_everything(0)
    model = default_model_factory(cfg)
    load_paligemma(model, cfg.train.pretrained)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _partitioned_loaded(cfg, world: int) -> dict[str, torch.Tensor]:
    seed_everything(0)
    model = build_partitioned(default_model_factory, cfg, micro_batch=2, world_size=world)
    assert all(hasattr(p, "ds_id") for p in model.parameters())
    report = load_paligemma(model, cfg.train.pretrained)
    assert report.loaded and not report.missing
    out = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.detach().clone()
    return out


def _assert_equal(got, want):
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name


def test_pretrained_into_a_partitioned_model_equals_a_plain_load(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    init_distributed()
    _, path = tiny_paligemma(tmp_path)
    cfg = _config(path)
    want = _plain_loaded(cfg)
    random_init = {n: p for n, p in default_model_factory(cfg).named_parameters()}
    assert not torch.equal(want["embed_tokens.weight"], random_init["embed_tokens.weight"])
    _assert_equal(_partitioned_loaded(cfg, world=1), want)


def _rank_main(rank: int, world: int, port: int, path: str, out: str) -> None:
    import os
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_distributed()
    got = _partitioned_loaded(_config(path), world)
    if rank == 0:
        torch.save(got, out)
    shutdown_distributed()   # barrier + destroy: a peer torn down after rank 0 exits aborts (SIGABRT)


def test_pretrained_into_a_model_partitioned_over_two_ranks(tmp_path):
    _, path = tiny_paligemma(tmp_path)
    out = tmp_path / "gathered.pt"
    mp.start_processes(_rank_main, args=(2, free_port(), str(path), str(out)), nprocs=2, start_method="spawn")
    got = torch.load(out, weights_only=True)
    _assert_equal(got, _plain_loaded(_config(path)))


def test_missing_pretrained_path_is_a_config_error_at_launch_not_at_load(tmp_path):
    from megavla.train.preflight import check_paths
    cfg = load_config(None, [f"train.pretrained={tmp_path / 'nope'}"])  # a finetuned run's saved config still loads
    with pytest.raises(ConfigError, match="train.pretrained=.*no such file"):
        check_paths(cfg)


def test_a_fresh_run_loads_train_pretrained_and_a_resume_does_not(tmp_path, monkeypatch):
    """The trainer calls load_paligemma on the built model (every rank, before the engine) for a fresh
    run only: a resume's own checkpoint replaces the initial weights."""
    from megavla.model import pretrained
    from megavla.train.entry import run
    from helpers.toy_training import toy_loader_factory, toy_model_factory
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(pretrained, "load_paligemma",
                        lambda model, path, strict=True: calls.append((type(model).__name__, path, strict)))
    weights = tmp_path / "paligemma"
    weights.mkdir()
    overrides = [f"train.run_dir={tmp_path / 'run'}", "train.zero_stage=1", "train.precision=fp32",
                 "train.warmup_steps=1", "train.progress=false", "data.batch_size=4",
                 f"train.pretrained={weights}", "train.pretrained_strict=false"]
    assert run(load_config(None, overrides + ["train.steps=2"]), model_factory=toy_model_factory,
               loader_factory=toy_loader_factory) == 0
    assert calls == [("ToyVLA", str(weights), False)]
    assert run(load_config(None, overrides + ["train.steps=4"]), resume="auto", model_factory=toy_model_factory,
               loader_factory=toy_loader_factory) == 0
    assert len(calls) == 1   # the resume trained steps 3-4 from its checkpoint, nothing loaded
