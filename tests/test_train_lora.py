"""LoRA finetuning (train.lora, megavla/model/lora.py) with the tiny VLA: adapters start at the base
model and merge exactly; a run from the PaliGemma fixture with LoRA trains only the adapters (and
train.trainable_parts), lowers the loss, resumes exactly and exports merged plain weights; ZeRO-3 on
2 processes with activation checkpointing.

This file is also the worker of the 2-process test (`python tests/test_train_lora.py CONFIG`)."""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from megavla.config import load_config, write_yaml
from megavla.model.lora import LoRALinear, apply_lora, freeze_for_lora, merge_lora
from megavla.model.synthetic import random_batch
from megavla.model.vla import build_model

CYCLE = 2   # the loader repeats this many batches: a short finetune must fit them


class RandomBatchLoader:
    """Endless tiny-VLA batches, deterministic per (seed, rank, index mod CYCLE); JSON state."""

    def __init__(self, model_cfg, seed: int, rank: int, world_size: int, batch_size: int):
        self.model_cfg, self.seed, self.rank, self.world_size = model_cfg, seed, rank, world_size
        self.batch_size, self.index = batch_size, 0

    def __iter__(self):
        while True:
            seed = self.seed * 1000 + self.rank * 100 + self.index % CYCLE
            self.index += 1
            yield random_batch(self.model_cfg, self.batch_size, num_cameras=1, seed=seed)

    def state_dict(self) -> dict:
        return {"index": self.index, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])

    def skip_counts(self) -> dict:
        return {"bad_sample": 0}


def loader_factory(cfg, rank, world_size, seed=None, split="train"):
    return RandomBatchLoader(cfg.model, cfg.data.seed if seed is None else seed, rank, world_size,
                             cfg.data.batch_size)


def tiny_model_cfg():
    return load_config(None, ["model.preset=tiny", "model.kernels=torch", "model.action_dim=8",
                              "model.state_dim=8"]).model


@torch.no_grad()
def test_adapters_start_at_the_base_model_and_merge_exactly(caplog):
    """B = 0: the adapted model's loss equals the base model's; after (simulated) training the merged
    weights load into a model built without LoRA and give the unmerged model's loss."""
    mcfg = tiny_model_cfg()
    torch.manual_seed(0)
    model = build_model(mcfg).eval()
    batch = random_batch(mcfg, action_dims=6, state_dims=5, gripper_dim=5)
    noise, t = torch.randn(batch.actions.shape), torch.full((batch.batch_size,), 0.4)
    base = model(batch, noise, t)["loss"]
    lora_cfg = load_config(None, ["train.lora.rank=4", "train.lora.alpha=8",
                                  "train.lora.parts=[backbone,expert,vision]"]).train.lora
    added = apply_lora(model, lora_cfg)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    # tiny: 2 layers x (4 attention + 3 MLP) in backbone and expert, 2 x (4 + 2) in the vision tower
    assert len(layers) == 2 * 7 * 2 + 2 * 6 and added == sum(4 * (m.in_features + m.out_features) for m in layers)
    assert torch.equal(model(batch, noise, t)["loss"], base)
    with torch.no_grad():
        for m in layers:
            m.lora_B.normal_(0.0, 0.05)
    adapted = model(batch, noise, t)["loss"]
    assert abs(float(adapted - base)) > 1e-3        # the adapters do change the model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    layers[0].merge()
    layers[0].unmerge()
    assert torch.allclose(layers[0].weight, before[f"{_name(model, layers[0])}.weight"], atol=1e-6)

    merged = copy.deepcopy(model)
    assert merge_lora(merged) == len(layers)
    state = merged.state_dict()
    assert not [k for k in state if "lora_" in k]
    plain = build_model(mcfg).eval()
    plain.load_state_dict(state, strict=True)     # no LoRA in this model
    assert float(plain(batch, noise, t)["loss"]) == pytest.approx(float(adapted), rel=1e-5, abs=1e-6)

    # a fresh expert (adaLN-zero gates at 0) frozen under its adapters: they could never learn -> said
    fresh = build_model(mcfg)
    apply_lora(fresh, lora_cfg)
    assert freeze_for_lora(fresh, ["expert.action_out_proj"])[0] == added + sum(
        p.numel() for p in fresh.expert.action_out_proj.parameters())
    assert "adaRMS gates of the action expert are zero and frozen" in caplog.text
    with pytest.raises(ValueError, match="no parameter name starts with 'experts'"):
        freeze_for_lora(fresh, ["experts"])


def _name(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def test_bad_lora_config_is_refused_with_the_fix():
    from megavla.config import ConfigError
    for overrides, needle in ((["train.trainable_parts=[expert]"], "applies only with LoRA on"),
                              (["train.lora.rank=-1"], "train.lora: rank=-1 must be >= 0"),
                              (["train.lora.rank=8", "train.lora.parts=[]"], "at least one entry"),
                              (["train.lora.targets=[attn]"], "choose one of ['attention', 'mlp']")):
        with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            load_config(None, overrides)
    assert not load_config(None, ["train.lora.rank=null"]).train.lora.enabled


def test_summary_prints_lora_next_to_full_finetune(capsys):
    """`megavla model summary configs/pi05-3b.yaml train.lora.rank=16`: trainable parameters and AdamW
    state of both; the adapter count from the layer widths: r x (in + out) per adapted Linear."""
    from megavla.model import cli as model_cli
    from megavla.model.presets import resolve
    assert model_cli.main(["summary", "configs/pi05-3b.yaml", "train.lora.rank=16"]) == 0
    out = capsys.readouterr().out
    m = resolve(load_config("configs/pi05-3b.yaml").model)

    def per_layer(width: int, mlp: int) -> int:   # q, k, v, o, gate, up, down
        q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
        return (width + q) + 2 * (width + kv) + (q + width) + 3 * (width + mlp)
    adapters = 16 * m.depth * (per_layer(m.width, m.mlp_dim) + per_layer(m.expert_width, m.expert_mlp_dim))
    full = next(line for line in out.splitlines() if line.startswith("full finetune"))
    lora = next(line for line in out.splitlines() if line.startswith("LoRA r=16 a=16"))
    assert f"{adapters:,d}" in lora and "MB" in lora and "GB" in full     # bf16: 12 bytes per trainable
    total = int(next(line for line in out.splitlines() if line.startswith("total")).split()[1].replace(",", ""))
    assert f"{total:,d}" in full and f"{total * 12 / 1e9:.2f} GB" in full
    assert f"{adapters * 12 / 1e6:.2f} MB" in lora


# ---- training runs -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paligemma(tmp_path_factory):
    pytest.importorskip("transformers")
    from helpers.tiny_models import tiny_paligemma
    _, path = tiny_paligemma(tmp_path_factory.mktemp("pg"))
    return path


def run_cfg(run_dir: Path, pretrained: Path, *extra: str):
    from megavla.model.pretrained import paligemma_size_overrides
    from helpers.tiny_models import TEXT_VOCAB
    sizes = dict(paligemma_size_overrides(pretrained), text_vocab_size=TEXT_VOCAB, fast_vocab_size=16,
                 action_dim=8, state_dim=8)
    return load_config(None, ["model.preset=tiny", "model.kernels=torch", f"train.run_dir={run_dir}",
                              f"train.pretrained={pretrained}", "train.zero_stage=2", "train.precision=fp32",
                              "train.lr=0.01", "train.warmup_steps=1", "train.log_every=1",
                              "train.progress=false", "train.tensorboard=false", "train.val_action_figures=0",
                              "train.lora.rank=4", "train.lora.parts=[backbone,expert,vision]",
                              "train.trainable_parts=[expert]", "data.batch_size=2",
                              "data.augment_images=false", "data.normalization=none"]
                       + [f"model.{k}={v}" for k, v in sizes.items()] + list(extra))


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss/total"] for r in map(json.loads, lines) if "loss/total" in r}


def warm_start(cfg) -> dict[str, torch.Tensor]:
    """The weights a fresh run starts from before LoRA: the seeded build + the PaliGemma load."""
    from megavla.model.pretrained import load_paligemma
    from megavla.train.engine import seed_everything
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model)
    load_paligemma(model, cfg.train.pretrained)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def check_frozen_and_trained(weights: dict, start: dict, trainable_prefixes: tuple[str, ...]) -> None:
    adapters = {n for n in weights if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}
    assert adapters and set(weights) - adapters == set(start)
    for name, value in start.items():
        if name.startswith(trainable_prefixes):
            assert not torch.equal(weights[name], value), name          # trained
        else:
            assert torch.equal(weights[name], value), name              # frozen: bit-identical
    untrained = [n for n in adapters if n.endswith("lora_B") and not weights[n].abs().max() > 0]
    assert not untrained, untrained


def test_lora_finetune_from_paligemma_resumes_exactly_and_exports(tmp_path, monkeypatch, paligemma):
    from megavla.model.io import load_model
    from megavla.train import checkpoint as ckpt
    from megavla.train.entry import run
    from megavla.train.export import consolidated_state_dict, export
    from megavla.train.safe_load import load_pt
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    steps = ["train.steps=6", "train.save_every=3", "model.activation_checkpointing=true"]
    straight = run_cfg(tmp_path / "straight", paligemma, *steps)
    assert run(straight, loader_factory=loader_factory) == 0
    split = run_cfg(tmp_path / "split", paligemma, *steps, "train.max_steps_per_run=3")
    assert run(split, loader_factory=loader_factory) == 0
    assert run(split, resume="auto", loader_factory=loader_factory) == 0
    got, want = losses(tmp_path / "split"), losses(tmp_path / "straight")
    assert sorted(got) == list(range(1, 7))
    for step in (4, 5, 6):                      # the resumed half equals the uninterrupted run
        assert got[step] == pytest.approx(want[step], rel=1e-6), step
    assert want[5] + want[6] < want[1] + want[2]        # the short finetune lowers the loss
    from megavla.train.errors import ResumeError
    other = run_cfg(tmp_path / "split", paligemma, *steps, "train.lora.rank=8")
    with pytest.raises(ResumeError, match="was trained with train.lora"):   # other adapters: refused
        run(other, resume="auto", loader_factory=loader_factory)
    assert load_config(tmp_path / "split" / "config.yaml").train.lora.rank == 4     # run dir's config kept

    final = ckpt.list_checkpoints(tmp_path / "split" / "checkpoints")[-1]
    weights = consolidated_state_dict(final)
    check_frozen_and_trained(weights, warm_start(straight), ("expert.",))
    # only the trainable parameters have optimizer state (ZeRO-2's fp32 partition + Adam moments)
    trainable = sum(v.numel() for n, v in weights.items() if "lora_" in n or n.startswith("expert."))
    optim = load_pt(next(final.glob("*optim_states.pt")), deepspeed_state=True)["optimizer_state_dict"]
    assert sum(t.numel() for t in optim["single_partition_of_fp32_groups"]) == trainable
    assert trainable < 0.5 * sum(v.numel() for v in weights.values())   # tiny: the expert is ~45 %

    # export: adapters merged into plain weights that a model without LoRA loads; same loss
    out = tmp_path / "export"
    export(final, out)
    plain = load_model(out).eval()
    lora_model = build_model(straight.model).eval()
    apply_lora(lora_model, straight.train.lora)
    lora_model.load_state_dict(weights, strict=True)
    batch = random_batch(straight.model, 2, num_cameras=1, seed=5)
    noise, t = torch.randn(batch.actions.shape), torch.full((2,), 0.3)
    from megavla.eval.policy import load_checkpoint
    direct = load_checkpoint(final, weights="raw").model        # eval / serve straight from the checkpoint
    assert not [k for k in direct.state_dict() if "lora_" in k]
    with torch.no_grad():
        exported, adapted = plain(batch, noise, t)["loss"], lora_model(batch, noise, t)["loss"]
        merged_on_load = direct(batch, noise, t)["loss"]
    assert float(exported) == pytest.approx(float(adapted), rel=1e-5, abs=1e-6)
    assert float(merged_on_load) == pytest.approx(float(exported), rel=1e-6, abs=1e-7)
    assert not [k for k in load_checkpoint(out).model.state_dict() if "lora_" in k]   # the export loads too


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (3, "bf16")])
def test_lora_trains_under_zero0_and_bf16_zero3(tmp_path, monkeypatch, paligemma, stage, precision):
    """ZeRO-0 (no partitioning: the engine's own optimizer over the trainable parameters) and bf16
    under zero.Init (adapters created in the partitioned base's dtype): frozen weights stay put."""
    from megavla.train import checkpoint as ckpt
    from megavla.train.entry import run
    from megavla.train.export import consolidated_state_dict
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    cfg = run_cfg(tmp_path / "run", paligemma, f"train.zero_stage={stage}", f"train.precision={precision}",
                  "train.steps=2")
    assert run(cfg, loader_factory=loader_factory) == 0
    assert all(v == v and v < 1e4 for v in losses(tmp_path / "run").values())   # finite
    weights = consolidated_state_dict(ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")[-1])
    start = warm_start(cfg)
    if precision == "bf16":      # frozen weights are kept in bf16 by the engine
        start = {n: v.to(torch.bfloat16).float() for n, v in start.items()}
    check_frozen_and_trained(weights, start, ("expert.",))


def test_resume_at_another_zero_stage_keeps_frozen_weights(tmp_path, monkeypatch, paligemma, before=2, after=1):
    """A ZeRO-stage (or world-size) change resumes through DeepSpeed's universal checkpoint, which
    carries only optimizer-held parameters: the frozen pretrained weights come from the original
    checkpoint's model states (here ZeRO-2's whole tensors; ZeRO-3's per-rank fragments in the
    2-process test), not from a fresh build."""
    from megavla.train import checkpoint as ckpt
    from megavla.train.entry import run
    from megavla.train.export import consolidated_state_dict
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    first = run_cfg(tmp_path / "run", paligemma, "train.steps=3", "train.max_steps_per_run=2",
                    f"train.zero_stage={before}")
    assert run(first, loader_factory=loader_factory) == 0
    second = run_cfg(tmp_path / "run", paligemma, "train.steps=3", f"train.zero_stage={after}")
    assert run(second, resume="auto", loader_factory=loader_factory) == 0
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3]
    weights = consolidated_state_dict(ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")[-1])
    check_frozen_and_trained(weights, warm_start(first), ("expert.",))


@pytest.mark.distributed
def test_lora_zero3_two_processes_resumes_exactly(tmp_path, monkeypatch, paligemma):
    """ZeRO-3 (zero.Init-partitioned base, adapters partitioned by DeepSpeed at engine build), 2 gloo
    ranks, activation checkpointing: 2 steps + resume + 1 equals 3 straight steps; the frozen weights
    (restored on resume from DeepSpeed's frozen-parameter fragments, not re-read from the pretrained
    checkpoint) stay bit-identical, the adapters train, and the export merges them."""
    from megavla.model.io import load_model
    from megavla.train import checkpoint as ckpt
    from megavla.train.cli import launch_local
    from megavla.train.export import consolidated_state_dict, export
    worker = [sys.executable, str(Path(__file__))]

    def launch(name: str, *extra: str) -> Path:
        cfg = run_cfg(tmp_path / name, paligemma, "train.zero_stage=3", "train.steps=3",
                      "model.activation_checkpointing=true", *extra)
        write_yaml(cfg, tmp_path / f"{name}.yaml")
        return tmp_path / f"{name}.yaml"

    assert launch_local(2, [str(launch("straight"))], command=worker) == 0
    split = launch("split", "train.max_steps_per_run=2")
    assert launch_local(2, [str(split)], command=worker) == 0
    assert launch_local(2, [str(split), "--resume", "auto"], command=worker) == 0
    got, want = losses(tmp_path / "split"), losses(tmp_path / "straight")
    assert sorted(got) == [1, 2, 3] and got[3] == pytest.approx(want[3], rel=1e-6)
    final = ckpt.list_checkpoints(tmp_path / "split" / "checkpoints")[-1]
    weights = consolidated_state_dict(final)
    start = warm_start(load_config(split))
    check_frozen_and_trained(weights, start, ("expert.",))
    export(final, tmp_path / "export")
    assert not [k for k in load_model(tmp_path / "export").state_dict() if "lora_" in k]

    # one more step at world size 1: a universal resume; the frozen weights come from the 2 ranks'
    # ZeRO-3 fragments of step 3 (DeepSpeed's conversion leaves them out)
    from megavla.train.entry import run
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    one = run_cfg(tmp_path / "split", paligemma, "train.zero_stage=3", "train.steps=4",
                  "model.activation_checkpointing=true")
    assert run(one, resume="auto", loader_factory=loader_factory) == 0
    weights = consolidated_state_dict(ckpt.list_checkpoints(tmp_path / "split" / "checkpoints")[-1])
    check_frozen_and_trained(weights, start, ("expert.",))


if __name__ == "__main__":
    from megavla.train.entry import run, run_then_shutdown
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    resume = sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--resume" else None
    sys.exit(run_then_shutdown(lambda: run(load_config(sys.argv[1]), resume=resume, loader_factory=loader_factory)))


def test_lora_finetune_from_the_lerobot_pi05_fixture_lowers_the_loss(tmp_path, monkeypatch):
    """The π0.5 checkpoint written by LeRobot itself (tests/fixtures/lerobot_pi05_tiny) as the warm
    start: a pretrained expert, so adapters on the backbone and the expert alone learn; every loaded
    weight stays bit-identical and the short finetune lowers the loss."""
    from megavla.model.pretrained_pi0 import load_pi0, pi0_size_overrides
    from megavla.train.engine import seed_everything
    from megavla.train.entry import run
    from megavla.train.export import consolidated_state_dict
    from megavla.train import checkpoint as ckpt
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    pi05 = Path(__file__).resolve().parent / "fixtures" / "lerobot_pi05_tiny"
    sizes = dict(pi0_size_overrides(pi05), fast_vocab_size=16)
    cfg = load_config(None, ["model.preset=tiny", "model.kernels=torch", f"train.run_dir={tmp_path / 'run'}",
                             f"train.pretrained={pi05}", "train.zero_stage=2", "train.precision=fp32",
                             "train.lr=0.01", "train.warmup_steps=1", "train.log_every=1", "train.steps=6",
                             "train.progress=false", "train.tensorboard=false", "train.val_action_figures=0",
                             "train.lora.rank=4", "train.lora.parts=[backbone,expert]", "data.batch_size=2",
                             "data.augment_images=false", "data.normalization=none"]
                      + [f"model.{k}={v}" for k, v in sizes.items()])
    assert cfg.model.state_mode == "text"                       # π0.5 reads its state from the prompt
    assert run(cfg, loader_factory=loader_factory) == 0
    got = losses(tmp_path / "run")
    assert got[5] + got[6] < got[1] + got[2], got                # the short finetune lowers the loss

    seed_everything(cfg.train.seed)
    start = build_model(cfg.model)
    load_pi0(start, pi05)
    final = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    weights = consolidated_state_dict(final)
    check_frozen_and_trained(weights, {n: p.detach() for n, p in start.named_parameters()}, ())
