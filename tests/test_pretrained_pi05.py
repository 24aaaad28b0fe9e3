"""LeRobot π0.5 / π0 checkpoints -> MegaVLA, against outputs LeRobot itself recorded.

The fixtures (tests/fixtures/lerobot_pi05_tiny, lerobot_pi0_tiny) were written by
tests/fixtures/make_lerobot_pi05_fixture.py with lerobot 0.4.4's PI05Policy / PI0Policy and its own
save_pretrained (see MADE_BY.json): tiny sizes, random weights, token ids standing in for prompts.
fp32, CPU; tolerance 1e-4 (lerobot's own results move ~1e-6 with the thread count)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megavla.batch import Batch
from megavla.config.model import ModelConfig
from megavla.kernels import AttentionLayout
from megavla.model.gemma import run_shared_layers
from megavla.model.inference import encode_prefix
from megavla.model.pretrained import PretrainedLoadError
from megavla.data.prompt import pi05_prompt
from megavla.model.pretrained_pi0 import is_pi0_checkpoint, load_pi0, pi0_size_overrides, pi0_to_megavla_name
from megavla.model.vla import VLA, prefix_length

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PI05, PI0 = FIXTURES / "lerobot_pi05_tiny", FIXTURES / "lerobot_pi0_tiny"


def _megavla(path: Path, seed: int = 123, **overrides) -> VLA:
    sizes = dict(pi0_size_overrides(path), **overrides)
    torch.manual_seed(seed)
    return VLA(ModelConfig(preset="tiny", kernels="torch", attention="sdpa", fast_vocab_size=16, **sizes)).eval()


def _batch(rec: dict[str, torch.Tensor]) -> Batch:
    tokens, state = rec["input.tokens"], rec["input.state"]
    b, h, a = rec["input.noise"].shape
    return Batch(images=rec["input.images"], image_mask=rec["input.image_mask"], text_tokens=tokens,
                 text_mask=rec["input.text_mask"], state=state, state_mask=torch.ones_like(state, dtype=torch.bool),
                 actions=torch.zeros(b, h, a), action_dim_mask=torch.ones(b, a, dtype=torch.bool),
                 action_time_mask=torch.ones(b, h, dtype=torch.bool), fast_tokens=torch.zeros(b, 1, dtype=torch.long),
                 fast_mask=torch.zeros(b, 1, dtype=torch.bool), subtask_tokens=torch.zeros(b, 1, dtype=torch.long),
                 subtask_mask=torch.zeros(b, 1, dtype=torch.bool), embodiment=torch.zeros(b, dtype=torch.long))


@torch.no_grad()
def _outputs(vla: VLA, rec: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    batch = _batch(rec)
    prefix, hidden, cache = encode_prefix(vla, batch)
    features, _ = vla.backbone.norm(hidden)
    ex, ex_kind, ex_valid = vla.expert_tokens(rec["input.x_t"], rec["input.time"], batch, prefix_length(prefix))
    layout = AttentionLayout.from_kinds(torch.cat([prefix.kind, ex_kind.to(prefix.kind.dtype)], 1),
                                        torch.cat([prefix.valid, ex_valid], 1), ex.x.shape[1])
    _, ex_h, _ = run_shared_layers(None, vla.expert.stack, None, ex, vla.shared_attention(None, layout, cache))
    steps = json.loads((PI05 / "MADE_BY.json").read_text())["sizes"]["steps"]
    return dict(prefix_features=features, prefix_valid=prefix.valid,
                velocity=vla.expert.velocity(ex_h, ex.cond, vla.cfg.chunk_length),
                actions=vla.sample_actions(batch, num_steps=steps, noise=rec["input.noise"]))


@pytest.mark.parametrize("fixture", [PI05, PI0], ids=["pi05", "pi0"])
def test_matches_lerobot_recorded_outputs(fixture):
    torch.set_num_threads(1)
    rec = load_file(str(fixture / "records.safetensors"))
    assert is_pi0_checkpoint(fixture)
    vla = _megavla(fixture)
    report = load_pi0(vla, fixture)
    assert not report.missing and not report.unexpected
    assert "model.paligemma_with_expert.gemma_expert.lm_head.weight" in report.ignored
    got = _outputs(vla, rec)
    valid = rec["output.prefix_valid"]
    torch.testing.assert_close(got["prefix_valid"], valid)
    torch.testing.assert_close(got["prefix_features"][valid], rec["output.prefix_features"][valid], atol=1e-4, rtol=1e-4)
    for name in ("velocity", "actions"):
        torch.testing.assert_close(got[name], rec[f"output.{name}"], atol=1e-4, rtol=1e-4, msg=name)
    # not vacuous: the same model before loading is far off
    fresh = _outputs(_megavla(fixture), rec)
    assert (fresh["velocity"] - rec["output.velocity"]).abs().max() > 1e-2


def test_sizes_come_from_the_checkpoint():
    sizes = pi0_size_overrides(PI05)
    assert sizes["width"] == 64 and sizes["expert_width"] == 32 and sizes["num_heads"] == 8
    assert sizes["head_dim"] == 8 and sizes["depth"] == 2 and sizes["text_vocab_size"] == 320
    assert sizes["image_size"] == 32 and sizes["patch_size"] == 8 and sizes["chunk_length"] == 4
    assert sizes["state_mode"] == "text" and sizes["time_conditioning"] == "adarms"
    pi0 = pi0_size_overrides(PI0)
    assert pi0["state_mode"] == "continuous" and pi0["time_conditioning"] == "mlp" and pi0["state_dim"] == 32


def test_openpi_layout_without_model_prefix_loads_the_same(tmp_path):
    """openpi's PyTorch checkpoints hold the same tensors without LeRobot's ``model.`` prefix."""
    tensors = load_file(str(PI05 / "model.safetensors"))
    openpi = tmp_path / "openpi"
    openpi.mkdir()
    save_file({k[len("model."):]: v for k, v in tensors.items()}, str(openpi / "model.safetensors"))
    assert is_pi0_checkpoint(openpi)
    assert pi0_size_overrides(openpi) == {k: v for k, v in pi0_size_overrides(PI05).items() if k != "chunk_length"}
    want, got = _megavla(PI05), _megavla(PI05, seed=7)
    load_pi0(want, PI05)
    load_pi0(got, openpi)
    for name, value in want.state_dict().items():
        if not name.startswith("embed_tokens"):
            assert torch.equal(got.state_dict()[name], value), name
    assert torch.equal(got.embed_tokens.weight[:320], want.embed_tokens.weight[:320])


def test_strict_load_names_the_tensors(tmp_path):
    tensors = load_file(str(PI05 / "model.safetensors"))
    dropped = "model.paligemma_with_expert.gemma_expert.model.layers.1.mlp.up_proj.weight"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((PI05 / "config.json").read_text())
    extra = {"model.paligemma_with_expert.extra_head.weight": torch.zeros(2)}
    save_file({k: v for k, v in tensors.items() if k != dropped} | extra, str(broken / "model.safetensors"))
    with pytest.raises(PretrainedLoadError) as err:
        load_pi0(_megavla(PI05), broken)
    assert "expert.stack.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "model.paligemma_with_expert.extra_head.weight" in str(err.value)
    report = load_pi0(_megavla(PI05), broken, strict=False)
    assert report.missing == ["expert.stack.layers.1.mlp.up_proj.weight"]
    # a model of the wrong size: the message names the tensor and the overrides to pass
    with pytest.raises(PretrainedLoadError, match=r"mlp_dim.*model\.mlp_dim=128"):
        load_pi0(_megavla(PI05, mlp_dim=96), PI05)
    # pi0.5 into a model that keeps a state embedding: the extra parameter is named
    with pytest.raises(PretrainedLoadError, match="state_embed.weight"):
        load_pi0(_megavla(PI05, state_mode="discrete"), PI05)


def test_name_mapping():
    assert pi0_to_megavla_name("model.paligemma_with_expert.paligemma.lm_head.weight") == "embed_tokens.weight"
    assert pi0_to_megavla_name("paligemma_with_expert.gemma_expert.model.layers.3.input_layernorm.dense.bias") \
        == "expert.stack.layers.3.input_layernorm.dense.bias"
    assert pi0_to_megavla_name("model.paligemma_with_expert.paligemma.model.language_model.layers.0.mlp.up_proj.weight") \
        == "backbone.layers.0.mlp.up_proj.weight"
    assert pi0_to_megavla_name("action_time_mlp_in.weight") == "expert.action_time_mlp_in.weight"
    assert pi0_to_megavla_name("model.something_else.weight") is None


def test_pi05_prompt_is_lerobots_format():
    import numpy as np
    assert pi05_prompt(" pick_up the\ncube ", np.array([-1.0, 0.0, 0.999])) == \
        "Task: pick up the cube, State: 0 128 255;\nAction: "


def test_convert_writes_a_model_directory_that_reproduces_lerobot(tmp_path):
    from megavla.model.cli import main
    from megavla.model.io import load_model
    out = tmp_path / "converted"
    assert main(["convert", str(PI05), "--out", str(out), "model.kernels=torch", "model.attention=sdpa"]) == 0
    assert main(["convert", str(PI05), "--out", str(out)]) == 2           # refuses to overwrite
    assert main(["convert", str(FIXTURES), "--out", str(tmp_path / "x")]) == 2   # not a π0 checkpoint
    model = load_model(out).eval()
    assert model.cfg.state_mode == "text" and model.state_embed is None
    rec = load_file(str(PI05 / "records.safetensors"))
    got = _outputs(model, rec)
    torch.testing.assert_close(got["actions"], rec["output.actions"], atol=1e-4, rtol=1e-4)


def test_train_pretrained_dispatches_to_the_pi0_loader(tmp_path):
    from megavla.model import pretrained
    report = pretrained.load_pretrained(_megavla(PI0), PI0)
    assert "expert.state_proj.weight" in report.loaded and not report.missing


def test_zero3_load_equals_a_plain_load(monkeypatch):
    """Built under DeepSpeed's zero.Init (1 rank, gloo), filled one gathered tensor at a time."""
    deepspeed = pytest.importorskip("deepspeed")
    from megavla.config import load_config
    from megavla.train.engine import build_partitioned, init_distributed, seed_everything
    from megavla.train.entry import default_model_factory
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    init_distributed()
    sizes = [f"model.{k}={v}" for k, v in pi0_size_overrides(PI05).items()]
    cfg = load_config(None, ["model.preset=tiny", "model.kernels=torch", "train.zero_stage=3",
                             "train.precision=fp32", f"train.pretrained={PI05}", "model.fast_vocab_size=16"] + sizes)
    seed_everything(0)
    plain = default_model_factory(cfg)
    load_pi0(plain, PI05)
    seed_everything(0)
    model = build_partitioned(default_model_factory, cfg, micro_batch=2, world_size=1)
    assert all(hasattr(p, "ds_id") for p in model.parameters())
    report = load_pi0(model, PI05)
    assert report.loaded and not report.missing
    want = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            assert torch.equal(p.detach(), want[name].detach()), name


@pytest.mark.parametrize("kind", ["pi05", "pi0"])
def test_full_size_names_and_shapes_map(kind):
    """Every tensor of lerobot's full-size policy (names and shapes recorded by lerobot itself) has a
    home of the same shape in MegaVLA's pi05-3b built from the sizes the loader reads."""
    from megavla.model.flops import meta_model
    from megavla.model.presets import PRESETS
    from megavla.model.pretrained_pi0 import pi0_sizes_from_shapes
    shapes = json.loads((FIXTURES / "lerobot_pi_full_shapes.json").read_text())[kind]
    sizes = pi0_sizes_from_shapes(shapes)
    assert {k: v for k, v in sizes.items() if k in PRESETS["pi05-3b"]} == \
        {k: v for k, v in PRESETS["pi05-3b"].items() if k != "fast_vocab_size"}
    params = {n: tuple(p.shape) for n, p in meta_model(ModelConfig(preset="pi05-3b", **sizes)).named_parameters()}
    homes = {}
    for key, shape in shapes.items():
        name = pi0_to_megavla_name(key)
        if key.endswith("gemma_expert.lm_head.weight"):
            continue
        assert name in params, key
        want = params[name]
        if name == "embed_tokens.weight":
            want = (sizes["text_vocab_size"], want[1])      # + FAST rows and markers, new
        elif name.startswith("expert.stack.norm.dense") and kind == "pi05":
            want = (want[0] * 3 // 2, *want[1:])              # + the unused gate rows
        assert tuple(shape) == want, key
        homes[name] = key
    assert sorted(homes) == sorted(params)
