"""KV-cached inference, save/load, presets, FLOPs and the summary CLI."""
import dataclasses

import pytest
import torch

from helpers.tiny_models import tiny_vla_and_batch
from megavla.config.model import ModelConfig
from megavla.model import cli as model_cli
from megavla.model.flops import FORWARD_PARTS, flops_breakdown, flops_per_sample, meta_model, parameter_counts
from megavla.model.io import load_model, save_model
from megavla.model.presets import PRESETS
from megavla.model.vla import build_model


@pytest.mark.parametrize("overrides", [{}, {"time_conditioning": "mlp", "state_mode": "continuous"}])
def test_kv_cached_inference_equals_uncached(overrides):
    model, batch = tiny_vla_and_batch(**overrides)
    noise = torch.randn(batch.actions.shape)
    cached = model.sample_actions(batch, num_steps=4, noise=noise, use_cache=True)
    uncached = model.sample_actions(batch, num_steps=4, noise=noise, use_cache=False)
    assert cached.abs().max() > 0
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)
    ids_c, mask_c = model.predict_subtask(batch, max_len=5, use_cache=True)
    ids_u, mask_u = model.predict_subtask(batch, max_len=5, use_cache=False)
    assert torch.equal(ids_c, ids_u) and torch.equal(mask_c, mask_u)
    assert int(ids_c.max()) < model.cfg.text_vocab_size
    fast_c, _ = model.predict_fast(batch, max_len=4, use_cache=True)
    fast_u, _ = model.predict_fast(batch, max_len=4, use_cache=False)
    assert torch.equal(fast_c, fast_u) and int(fast_c.max()) < model.cfg.fast_vocab_size


@pytest.mark.parametrize("conditioning", ["instruction", "subtask"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_sampling_matches_the_training_path_velocity(conditioning, use_cache):
    """One Euler step from t=1 uses the same velocity the training forward computes at t=1 (with
    subtask conditioning: given the same subtask tokens, here the batch's ground truth)."""
    model, batch = tiny_vla_and_batch(fast_weight=0.0, subtask_weight=0.0, action_conditioning=conditioning)
    noise = torch.randn(batch.actions.shape)
    used = batch.action_dim_mask[:, None, :]
    one_step = model.sample_actions(batch, num_steps=1, noise=noise, use_cache=use_cache,
                                    subtask=(batch.subtask_tokens, batch.subtask_mask))
    with torch.no_grad():
        v = model.run(dataclasses.replace(batch, actions=torch.zeros_like(batch.actions)), noise,
                      torch.ones(batch.batch_size)).velocity
    torch.testing.assert_close(one_step, torch.where(used, noise - v, torch.zeros_like(v)), atol=1e-5, rtol=1e-5)


def test_greedy_decode_stops_at_eos():
    model, batch = tiny_vla_and_batch()
    ids, _ = model.predict_subtask(batch, max_len=4)
    eos = int(ids[0, -1])
    again, mask = model.predict_subtask(batch, max_len=4, eos_id=eos)
    assert torch.equal(again[mask], ids[mask])  # after its eos a row may stop (eos-padded)
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        first = row.index(eos) if eos in row else len(row)
        assert mask[b].tolist() == [j <= first for j in range(len(row))]
    assert not mask[0, -1] or eos not in ids[0, :-1].tolist()


def test_embed_prefix_ignores_absent_cameras():
    model, batch = tiny_vla_and_batch()
    emb = model.embed_prefix(batch)
    assert emb.shape == (batch.batch_size, model.cfg.width) and torch.isfinite(emb).all()
    images = batch.images.clone()
    images[1, 1] = 255 - images[1, 1]  # sample 1 (human) has no wrist camera
    torch.testing.assert_close(model.embed_prefix(dataclasses.replace(batch, images=images)), emb)


def test_save_and_load_round_trip(tmp_path):
    model, batch = tiny_vla_and_batch(time_conditioning="mlp")
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert loaded.cfg == model.cfg
    noise = torch.randn(batch.actions.shape)
    torch.testing.assert_close(loaded.sample_actions(batch, 2, noise), model.sample_actions(batch, 2, noise))
    (tmp_path / "m" / "model_config.yaml").write_text("preset: tiny\ntime_conditioning: adarms\n")
    with pytest.raises(ValueError, match="weights do not match"):
        load_model(tmp_path / "m")


def test_preset_sizes():
    counts = {name: parameter_counts(meta_model(ModelConfig(preset=name))) for name in PRESETS}
    assert counts["tiny"]["total"] < 5e6
    assert 80e6 < counts["small"]["total"] < 130e6
    assert 0.9e9 < counts["1b"]["total"] < 1.3e9
    big = counts["pi05-3b"]
    assert 3.2e9 < big["total"] < 3.45e9
    assert 2.85e9 < big["vision"] + big["backbone"] < 3.0e9  # PaliGemma-3B (SigLIP So400m + Gemma-2B)
    assert 0.3e9 < big["expert"] < 0.45e9  # Gemma-300M shape + adaRMS modulation
    # meta-device counts equal a real instance's
    real = build_model(ModelConfig(preset="tiny"))
    assert parameter_counts(real) == counts["tiny"]


def test_flops_per_sample_follow_the_formula():
    cfg = ModelConfig(preset="pi05-3b")
    flops = flops_breakdown(cfg)
    params = parameter_counts(meta_model(cfg))
    # the backbone dominates: ~2 x its non-embedding params x its tokens
    tokens = 3 * 256 + cfg.text_len + cfg.state_dim + cfg.subtask_len + cfg.fast_len + 3  # + START x2, FAST_END
    norms = (2 * cfg_depth(cfg) + 1) * 2048
    non_embedding = params["backbone"] - meta_model(cfg).embed_tokens.weight.numel() - 256 * 2048 - norms
    assert flops["backbone"] == pytest.approx(2 * non_embedding * tokens, rel=1e-6)
    assert flops_per_sample(cfg) == pytest.approx(3 * sum(flops[k] for k in FORWARD_PARTS))
    assert 1e13 < flops_per_sample(cfg) < 2e13
    less = flops_per_sample(dataclasses.replace(cfg, fast_weight=0.0))
    assert less < flops_per_sample(cfg)


def cfg_depth(cfg) -> int:
    return PRESETS[cfg.preset]["depth"]


def test_summary_cli(capsys):
    assert model_cli.main(["summary", "configs/pi05-3b.yaml"]) == 0
    out = capsys.readouterr().out
    assert "3.36B" in out and "training FLOPs per sample" in out
    assert model_cli.main(["summary", "configs/pi05-3b.yaml", "model.preset=huge"]) == 2   # one line, no traceback
    err = capsys.readouterr().err
    assert "config error" in err and "preset" in err and "Traceback" not in err


def test_activation_checkpointing_gives_the_same_loss_and_grads():
    model, batch = tiny_vla_and_batch()
    ckpt = build_model(dataclasses.replace(model.cfg, activation_checkpointing=True))
    ckpt.load_state_dict(model.state_dict())
    noise, time = torch.randn(batch.actions.shape), torch.rand(batch.batch_size)
    grads = []
    for m in (model.train(), ckpt.train()):
        loss = m(batch, noise, time)["loss"]
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


def test_bf16_forward_backward_and_sampling_run():
    model, batch = tiny_vla_and_batch()
    model = model.to(torch.bfloat16)
    out = model(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32
    assert model.expert.action_out_proj.weight.grad.dtype == torch.bfloat16
    actions = model.sample_actions(batch, num_steps=2)
    assert actions.dtype == torch.float32 and torch.isfinite(actions).all()


def _backend_outputs(backends):
    model, batch = tiny_vla_and_batch()
    noise, time = torch.randn(batch.actions.shape), torch.rand(batch.batch_size)
    outs = {}
    for backend in backends:
        model.cfg = dataclasses.replace(model.cfg, attention=backend)
        with torch.no_grad():
            outs[backend] = model.run(batch, noise, time)
    for backend in backends[1:]:
        for name in ("velocity", "fast_logits", "subtask_logits"):
            torch.testing.assert_close(getattr(outs[backend], name), getattr(outs[backends[0]], name),
                                       atol=1e-5, rtol=1e-4, msg=f"{backend} {name}")
    return model, batch


def test_attention_backends_agree_on_the_model():
    """eager (the reference) and sdpa give the same training-path outputs."""
    model, batch = _backend_outputs(("eager", "sdpa"))
    with pytest.raises(ValueError, match="noise"):
        model.sample_actions(batch, noise=torch.zeros(1, 2, 3))


@pytest.mark.slow
def test_flex_attention_forward_agrees_on_the_model():
    """FlexAttention (forward only on CPU; its first call costs ~10 s of warm-up) == eager."""
    _backend_outputs(("eager", "flex"))


def test_decode_fast_goes_through_the_fast_tokenizer(caplog):
    np = pytest.importorskip("numpy")
    from megavla.tokenizers.fast import train_fast_tokenizer

    rng = np.random.default_rng(0)
    chunks = [np.cumsum(rng.normal(0, 0.05, (10, 6)), axis=0).clip(-1, 1) for _ in range(40)]
    tok = train_fast_tokenizer(chunks, vocab_size=256)
    model, _ = tiny_vla_and_batch(fast_vocab_size=256)
    ids = tok.encode(chunks[0])
    decoded = model.decode_fast(torch.tensor(ids), tok, horizon=10, dim=6)
    np.testing.assert_array_equal(decoded, tok.decode(ids, 10, 6))
    assert np.abs(decoded - chunks[0]).max() < 0.1  # FAST round trip (scale 10 -> step 0.1)
    with caplog.at_level("WARNING"):
        model.decode_fast(ids + [9999], tok, horizon=10, dim=6)
    assert "dropped 1 of" in caplog.text


def test_model_and_data_sizes_are_checked_when_the_config_loads(tmp_path):
    """A run config that names shard sets is refused at load (megavla.config.load_config), before
    any entry point starts a process; without shard sets the data section shapes no batch."""
    from megavla.config import ConfigError, load_config

    sources = [f"data.sources.robot={tmp_path / 'robot'}"]
    load_config("configs/pi05-3b.yaml", sources)
    wrong = ["data.chunk_length=50", "data.image_size=98"]
    with pytest.raises(ConfigError, match=r"^2 problems:\n  model.image_size=224 \(preset pi05-3b\) but "
                       r"data.image_size=98: .* set data.image_size=224 .*or model.image_size=98\n"
                       r"  model.chunk_length=10 but data.chunk_length=50: .* set model.chunk_length=50"):
        load_config("configs/pi05-3b.yaml", sources + wrong)
    assert load_config("configs/pi05-3b.yaml", wrong).data.chunk_length == 50   # no shard sets: loads
