"""A checkpoint from someone else must not run code: each reader (export, resume, evaluation,
serving, the world-size converter) refuses a `.pt` whose pickle would call something, naming the
file and the fix, and the payload's marker file never appears. The checkpoints are real ones, made
by the trainer (tiny VLA, 1 rank in process, ZeRO-0..3; 2 ranks for the universal path); the
payload is added the way an attacker would, with the manifest updated so the checkpoint looks intact.
The same safe path must still resume every ZeRO stage, and a 2 -> 1 world-size resume.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import subprocess

import pytest
import torch

import megavla
from megavla.config import load_config, write_yaml
from megavla.eval import cli as eval_cli
from megavla.eval.policy import CheckpointError, load_checkpoint
from megavla.train import export as export_cli
from megavla.train.checkpoint import universal_dir
from megavla.train.entry import run
from megavla.train.errors import TrainingError
from megavla.train.resume import MANIFEST_FILE, file_digests
from megavla.train.safe_load import (UNSAFE_EXIT, UnsafeCheckpointError, deepspeed_loads_are_safe,
                                     universal_converter_command)

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
# Which DeepSpeed file each ZeRO stage's export / resume reads first: the module states (ZeRO-0/1
# keep the whole module there) or an optimizer shard (what zero_to_fp32 consolidates).
POISON = {0: MODEL_STATES, 1: MODEL_STATES, 2: OPTIM_STATES.format(0), 3: OPTIM_STATES.format(0)}


class Payload:
    """Unpickling this calls Path.touch(marker): a stand-in for any code a pickle can run."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def poison(ckpt: pathlib.Path, name: str, marker: pathlib.Path) -> pathlib.Path:
    f = ckpt / name
    state = torch.load(f, weights_only=False)      # our own file, just written by the trainer
    state["note"] = Payload(marker)
    torch.save(state, f)
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    manifest["files"].update(file_digests(ckpt, [name]))
    (ckpt / MANIFEST_FILE).write_text(json.dumps(manifest))
    return f


def tiny_cfg(shards: pathlib.Path, run_dir: pathlib.Path, stage: int, steps: int = 2):
    return load_config(CONFIG, [f"data.sources.robot={shards / 'robot'}", f"train.run_dir={run_dir}",
                                "data.batch_size=2", "data.num_workers=0", f"train.steps={steps}",
                                "train.save_every=1", "train.log_every=1", "train.progress=false",
                                "train.tensorboard=false", "train.warmup_steps=1", f"train.zero_stage={stage}"])


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> pathlib.Path:
    from megavla.data.cli import main as data_main
    out = tmp_path_factory.mktemp("shards")
    assert data_main(["synth", "--out", str(out), "--scenes", "1", "--tasks", "1", "--episodes-per-combo", "2",
                      "--image-size", "32", "--embodiments", "robot/arm", "--shard-size-mb", "1",
                      "--workers", "1", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> dict[int, pathlib.Path]:
    """stage -> a run dir trained 2 steps (checkpoints step_000001, step_000002) at that ZeRO stage."""
    runs = {}
    for stage in range(4):
        run_dir = tmp_path_factory.mktemp(f"zero{stage}") / "run"
        assert run(tiny_cfg(shards, run_dir, stage)) == 0
        runs[stage] = run_dir
    return runs


def copy_run(src: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def assert_refusal(text: str, file: pathlib.Path, marker: pathlib.Path) -> None:
    assert str(file) in text and "could run code" in text and "megavla export" in text, text
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_export_refuses_a_pickle_that_runs_code(stage, trained, tmp_path, capsys):
    run_dir = copy_run(trained[stage], tmp_path)
    marker = tmp_path / "MARKER"
    bad = poison(run_dir / "checkpoints" / "step_000002", POISON[stage], marker)
    assert export_cli.main([str(run_dir), "--out", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err        # (zero_to_fp32's progress bar may come first)
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("megavla export: ")
    assert_refusal(err.strip().splitlines()[-1], bad, marker)
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_resume_refuses_a_pickle_that_runs_code(stage, trained, shards, tmp_path):
    run_dir = copy_run(trained[stage], tmp_path)
    marker = tmp_path / "MARKER"
    bad = poison(run_dir / "checkpoints" / "step_000002", POISON[stage], marker)
    with pytest.raises(TrainingError) as refused:        # on every rank, one line (entry's _rank0_decides)
        run(tiny_cfg(shards, run_dir, stage, steps=3), resume="auto")
    assert_refusal(str(refused.value), bad, marker)
    assert "step_000003" not in {p.name for p in (run_dir / "checkpoints").iterdir()}


def test_eval_and_serve_refuse_a_pickle_that_runs_code(trained, tmp_path, capsys):
    run_dir = copy_run(trained[0], tmp_path)
    marker = tmp_path / "MARKER"
    bad = poison(run_dir / "checkpoints" / "step_000002", MODEL_STATES, marker)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(run_dir)
    assert_refusal(str(refused.value), bad, marker)
    with pytest.raises(CheckpointError) as refused:
        megavla.load_policy(run_dir)                      # what `megavla serve` loads
    assert_refusal(str(refused.value), bad, marker)
    assert eval_cli.main(["closed-loop", str(run_dir), "--episodes-per-combo", "1", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert_refusal(err, bad, marker)


def test_deepspeed_own_loads_are_held_to_weights_only(trained, tmp_path):
    """Behind the up-front check: DeepSpeed's loaders themselves (its checkpoint engine, zero_to_fp32,
    a direct torch.serialization.load) refuse inside `deepspeed_loads_are_safe`, and torch.load is
    back to itself after it."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    run_dir = copy_run(trained[2], tmp_path)
    ckpt = run_dir / "checkpoints" / "step_000002"
    marker = tmp_path / "MARKER"
    bad = poison(ckpt, OPTIM_STATES.format(0), marker)
    original = torch.load
    with deepspeed_loads_are_safe():
        assert TorchCheckpointEngine().load(str(ckpt / MODEL_STATES))["module"]   # DeepSpeed's own state loads
        with pytest.raises(UnsafeCheckpointError, match="could run code"):
            TorchCheckpointEngine().load(str(bad))
        with pytest.raises(UnsafeCheckpointError, match=str(bad)):
            get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        with pytest.raises(Exception, match="Unsupported global"):
            torch.serialization.load(bad, weights_only=False)   # torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD
    assert torch.load is original and not marker.exists()


def test_safe_loading_still_resumes_every_zero_stage(trained, shards, tmp_path):
    for stage in range(4):
        run_dir = copy_run(trained[stage], tmp_path / f"z{stage}")
        assert run(tiny_cfg(shards, run_dir, stage, steps=3), resume="auto") == 0
        steps = [json.loads(line).get("step") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert 3 in steps and (run_dir / "checkpoints" / "step_000003").is_dir(), stage


@pytest.mark.distributed
def test_world_size_2_to_1_through_the_safe_converter(shards, tmp_path):
    """2 ranks, ZeRO-2 -> resume on 1 rank: ds_to_universal runs under the safe load (subprocess),
    the universal files load under it; a poisoned shard is refused by the converter itself and by
    the trainer before anything is built, also when it sits in the cached universal checkpoint."""
    from megavla.train.cli import launch_local
    run_dir = tmp_path / "run"
    config = tmp_path / "cfg.yaml"
    write_yaml(tiny_cfg(shards, run_dir, 2), config)
    assert launch_local(2, [str(config)]) == 0
    pristine = tmp_path / "pristine"
    shutil.copytree(run_dir, pristine)

    assert run(tiny_cfg(shards, run_dir, 2, steps=3), resume="auto") == 0   # world size 1 now
    ckpt = run_dir / "checkpoints" / "step_000002"
    assert (universal_dir(ckpt) / "zero").is_dir() and (run_dir / "checkpoints" / "step_000003").is_dir()

    marker = tmp_path / "MARKER"
    cached = next(universal_dir(ckpt).rglob("fp32.pt"))
    torch.save({"param": torch.zeros(1), "note": Payload(marker)}, cached)
    shutil.rmtree(run_dir / "checkpoints" / "step_000003")
    with pytest.raises(TrainingError) as refused:
        run(tiny_cfg(shards, run_dir, 2, steps=3), resume="auto")
    assert_refusal(str(refused.value), cached, marker)

    bad = poison(pristine / "checkpoints" / "step_000002", OPTIM_STATES.format(1), marker)
    proc = subprocess.run(universal_converter_command(bad.parent, tmp_path / "universal"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == UNSAFE_EXIT, proc.stderr[-2000:]
    assert_refusal(proc.stderr.strip().splitlines()[-1], bad, marker)


def test_the_up_front_check_reads_legacy_files_and_names_an_unreadable_one(tmp_path):
    from megavla.train.safe_load import check_files
    torch.save({"module": {"w": torch.zeros(2)}}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert check_files(tmp_path) == 1                  # not memory-mappable: read whole, still weights_only
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "junk.pt").write_bytes(b"PK\x03\x04" + b"x" * 100)
    with pytest.raises(UnsafeCheckpointError, match=f"{tmp_path / 'sub' / 'junk.pt'}: refused to load: not a readable"):
        check_files(tmp_path)
