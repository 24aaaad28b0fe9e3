"""torch.compile (megavla/model/compile.py): `train.compile` blocks / full equal eager training (loss,
gradients, weights), a compiled run resumes exactly, the compiled `sample_actions` equals eager.

Compiles are slow on a CPU (tiny: ~50 s cold per process); every process here uses inductor's
default on-disk cache (/tmp/torchinductor_$USER, the one a user's runs share), so a graph one test
compiled is read back by the next test and the next session. The 2-process runs are `slow`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megavla.config import ConfigError, load_config, write_yaml

REPO = Path(__file__).resolve().parents[1]
STEPS = 20


def tiny_model(**overrides):
    from megavla.config.model import ModelConfig
    from megavla.model.vla import build_model
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="tiny", kernels="torch", attention="sdpa", **overrides))


def test_compile_config_is_checked_at_load():
    demo = REPO / "configs" / "demo.yaml"
    assert load_config(demo, ["train.run_dir=x"]).train.compile == "none"
    with pytest.raises(ConfigError, match=r"compile=full cannot run under zero_stage=3.*train.compile=blocks"):
        load_config(demo, ["train.run_dir=x", "train.compile=full", "train.zero_stage=3"])
    with pytest.raises(ConfigError, match=r"train.compile.*'fast'.*\['none', 'blocks', 'full'\]"):
        load_config(demo, ["train.run_dir=x", "train.compile=fast"])
    assert load_config(demo, ["train.run_dir=x", "train.compile=blocks", "train.zero_stage=3"]).train.compile == "blocks"


def compiled_twin(mode: str, **overrides):
    """(eager tiny model, its deepcopy compiled in place with ``mode``); same state_dict keys."""
    import copy

    from megavla.model.compile import compile_model
    eager = tiny_model(**overrides).train()
    compiled = copy.deepcopy(eager)
    compile_model(compiled, mode)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    return eager, compiled


def assert_step_equal(eager, compiled, batch) -> None:
    """One forward + backward of both on ``batch`` with the same noise and time: equal loss and
    gradients (fp32)."""
    noise, time = torch.randn(batch.batch_size, eager.cfg.chunk_length, eager.cfg.action_dim), torch.rand(batch.batch_size)
    for model in (eager, compiled):
        model.zero_grad(set_to_none=True)
        model.loss = model(batch, noise, time)["loss"]
        model.loss.backward()
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=1e-6)
    grads = dict(eager.named_parameters())
    for name, p in compiled.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_blocks_compile_equals_eager_with_activation_checkpointing():
    """Per-block compile in place, checkpoint inside the compiled layer: the same loss and gradients
    as the eager model over 3 steps (fp32), the same state_dict keys, no graph break."""
    import torch._dynamo.utils as dynamo_utils

    from megavla.model.compile import compile_seconds
    from megavla.model.synthetic import random_batch
    eager, compiled = compiled_twin("blocks", activation_checkpointing=True)
    breaks_before = sum(dynamo_utils.counters["graph_break"].values())
    for step in range(3):
        assert_step_equal(eager, compiled, random_batch(eager.cfg, batch_size=4, num_cameras=3, seed=step))
    assert sum(dynamo_utils.counters["graph_break"].values()) == breaks_before
    assert compile_seconds() > 0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_full_compile_is_one_graph_equal_to_eager_across_token_lengths(checkpointing):
    """compile=full: one graph (no break) for forward + backward, reused across batches whose token
    columns differ (marked dynamic: no recompile), wrist cameras absent in human rows
    (the static vision path), with and without activation checkpointing; loss and gradients equal
    eager's."""
    import torch._dynamo.utils as dynamo_utils

    from megavla.model.synthetic import random_batch
    eager, compiled = compiled_twin("full", action_conditioning="instruction",
                                    activation_checkpointing=checkpointing)
    breaks = sum(dynamo_utils.counters["graph_break"].values())
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    for step, (text, subtask, fast) in enumerate([(6, 5, 8), (9, 3, 12), (5, 6, 7)]):
        batch = random_batch(eager.cfg, batch_size=4, num_cameras=3, text_len=text, subtask_len=subtask,
                             fast_len=fast, seed=step)
        assert not batch.image_mask.all()
        assert_step_equal(eager, compiled, batch)
    assert sum(dynamo_utils.counters["graph_break"].values()) == breaks
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs + 1


def test_compiled_sample_actions_equals_eager_across_prompt_lengths():
    """Prompts of 6 and 11 tokens (one text bucket) and batches of 1 and 3 rows (buckets 1, 4):
    actions equal eager's; the second length of a bucket compiles nothing new."""
    from torch._dynamo.utils import compilation_time_metrics

    from megavla.model.compile import CompiledSampler
    from megavla.model.synthetic import random_batch
    model = tiny_model().eval()
    sampler = CompiledSampler(model)

    def compiles() -> int:
        return len(compilation_time_metrics.get("_compile.compile_inner", []))

    for rows, text_len in ((1, 6), (1, 11), (3, 9)):
        batch = random_batch(model.cfg, batch_size=rows, num_cameras=3, text_len=text_len, seed=text_len)
        noise = torch.randn(rows, model.cfg.chunk_length, model.cfg.action_dim)
        before = compiles()
        got = sampler.sample_actions(batch, num_steps=4, noise=noise)
        if (rows, text_len) == (1, 11):
            assert compiles() == before, "a prompt length inside a compiled bucket recompiled"
        want = model.sample_actions(batch, num_steps=4, noise=noise)
        assert got.shape == want.shape == (rows, model.cfg.chunk_length, model.cfg.action_dim)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert not torch.equal(got, torch.zeros_like(got))


def test_load_policy_compile_infers_as_eager(tmp_path):
    """`load_policy(compile=True)` (what `megavla serve --compile` loads) on an export: the same
    actions as the eager policy for two observations of different prompt lengths."""
    import megavla
    from helpers.observations import observation
    from megavla.serving.random_export import write_random_export
    export = write_random_export(tmp_path / "export")
    eager, compiled = megavla.load_policy(export), megavla.load_policy(export, compile=True)
    assert compiled.compiled and not eager.compiled
    for prompt in ("pick up the cube", "put the red block in the bowl, then push the green one left"):
        obs = {**observation(), "prompt": prompt}
        np_eager, np_compiled = eager.infer(obs)["actions"], compiled.infer(obs)["actions"]
        torch.testing.assert_close(torch.from_numpy(np_compiled), torch.from_numpy(np_eager), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ 2 processes, the real trainer
def train(data: Path, run_dir: Path, *overrides: str, nproc: int = 2, resume: str | None = None) -> Path:
    from megavla.train.cli import launch_local
    shards = data / "shards"
    cfg = load_config(REPO / "configs" / "demo.yaml",
                      [f"data.sources.robot={shards / 'robot'}", f"data.sources.human={shards / 'human'}",
                       f"train.tokenizer_dir={data / 'tok'}", f"train.run_dir={run_dir}", f"train.steps={STEPS}",
                       "train.log_every=1", "train.warmup_steps=2", "train.save_every=10", "train.keep_last=4",
                       "train.progress=false", "train.tensorboard=false", "data.num_workers=0",
                       "data.batch_size=2", "train.precision=fp32", *overrides])
    config = run_dir.parent / f"{run_dir.name}.yaml"
    write_yaml(cfg, config)
    assert launch_local(nproc, [str(config)] + (["--resume", resume] if resume else [])) == 0
    return run_dir


def metrics(run_dir: Path) -> dict[int, tuple[float, ...]]:
    """step -> (loss/total, optim/grad_norm) or (loss/total,) where the run logs no gradient norm
    (ZeRO-0: DeepSpeed computes none; the final weights below then carry the gradients' check);
    a later line for the same step wins."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss/total" in rec:
            out[rec["step"]] = (rec["loss/total"], *([rec["optim/grad_norm"]] if "optim/grad_norm" in rec else []))
    return out


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from megavla.eval.policy import load_checkpoint
    return load_checkpoint(run_dir).model.state_dict()   # strict load into an eager model


def assert_runs_equal(got: Path, want: Path, steps=range(1, STEPS + 1)) -> None:
    a, b = metrics(got), metrics(want)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in steps:
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-6), step
    wa, wb = final_weights(got), final_weights(want)
    assert list(wa) == list(wb)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def eager_runs(tiny_synth_data, tmp_path_factory) -> dict[int, Path]:
    tmp = tmp_path_factory.mktemp("eager")
    return {stage: train(tiny_synth_data, tmp / f"zero{stage}", f"train.zero_stage={stage}") for stage in (0, 2)}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(3600)   # 2 eager + 1 compiled 2-rank runs: > 600 s on a loaded 2-core box
@pytest.mark.parametrize("mode,stage", [("blocks", 0), ("blocks", 2), ("full", 0), ("full", 2)])
def test_compiled_training_equals_eager_on_2_ranks(mode, stage, tiny_synth_data, eager_runs, tmp_path, capfd):
    """20 steps of the tiny VLA on 2 processes: per-step loss and gradient norm, and the final
    weights (loaded strictly into an eager model: no `_orig_mod.` names) equal the eager run's."""
    run = train(tiny_synth_data, tmp_path / "run", f"train.zero_stage={stage}", f"train.compile={mode}")
    assert f"compile={mode}: the first step spent" in capfd.readouterr().err   # rank 0's log line
    assert_runs_equal(run, eager_runs[stage])


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("mode", ["blocks", "full"])
def test_compiled_run_resumes_exactly(mode, tiny_synth_data, eager_runs, tmp_path):
    """A compiled (ZeRO-2) run stopped after step 10 and resumed (compiling again) ends where the
    uninterrupted eager run ends, step for step."""
    run = tmp_path / "run"
    train(tiny_synth_data, run, f"train.compile={mode}", "train.max_steps_per_run=10")
    assert sorted(metrics(run)) == list(range(1, 11))
    train(tiny_synth_data, run, f"train.compile={mode}", resume="auto")
    assert_runs_equal(run, eager_runs[2], steps=range(11, STEPS + 1))
