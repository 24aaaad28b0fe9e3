"""PaliGemma weights -> MegaVLA: a tiny random HF PaliGemma, saved locally, must give the same
image features, LM hidden states and logits in MegaVLA (fp32, CPU). Nothing is downloaded."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")  # test-only dependency (extras "test")

from helpers.tiny_models import IMAGE_TOKEN, TEXT_VOCAB, tiny_paligemma  # noqa: E402
from megavla.batch import Batch  # noqa: E402
from megavla.config.model import ModelConfig  # noqa: E402
from megavla.kernels import LM_SUFFIX, AttentionLayout  # noqa: E402
from megavla.model.gemma import Stream, run_shared_layers  # noqa: E402
from megavla.model.pretrained import (PretrainedLoadError, hf_to_megavla_name, load_paligemma,  # noqa: E402
                                      paligemma_size_overrides)
from megavla.model.vla import VLA, Tokens, prefix_length  # noqa: E402

def _batch(images, prompt, state_dim=4):
    b = images.shape[0]
    return Batch(images=images, image_mask=torch.ones(b, 1, dtype=torch.bool), text_tokens=prompt,
                 text_mask=torch.ones_like(prompt, dtype=torch.bool), state=torch.zeros(b, state_dim),
                 state_mask=torch.zeros(b, state_dim, dtype=torch.bool),
                 actions=torch.zeros(b, 4, 3), action_dim_mask=torch.ones(b, 3, dtype=torch.bool),
                 action_time_mask=torch.ones(b, 4, dtype=torch.bool), fast_tokens=torch.zeros(b, 1, dtype=torch.long),
                 fast_mask=torch.zeros(b, 1, dtype=torch.bool), subtask_tokens=torch.zeros(b, 1, dtype=torch.long),
                 subtask_mask=torch.zeros(b, 1, dtype=torch.bool), embodiment=torch.zeros(b, dtype=torch.long))


def _megavla(path, **overrides):
    sizes = dict(paligemma_size_overrides(path), text_vocab_size=TEXT_VOCAB, fast_vocab_size=16)
    sizes.update(overrides)
    cfg = ModelConfig(preset="tiny", kernels="torch", attention="sdpa", chunk_length=4, action_dim=3,
                      state_dim=4, **sizes)
    torch.manual_seed(123)
    return VLA(cfg).eval()


def _megavla_forward(vla, batch, suffix_ids):
    """Prefix (image + prompt, bidirectional) + causal LM_SUFFIX tokens, as PaliGemma's prefix-LM."""
    prefix = vla.prefix_tokens(batch)
    b, s = suffix_ids.shape
    positions = prefix_length(prefix)[:, None] + torch.arange(s)[None, :]
    suffix = Tokens(vla._embed_ids(suffix_ids), torch.ones(b, s, dtype=torch.bool),
                    torch.full((b, s), LM_SUFFIX, dtype=prefix.kind.dtype), positions)
    tokens = Tokens.cat([prefix, suffix])
    layout = AttentionLayout.from_kinds(tokens.kind, tokens.valid)
    hidden, _, _ = run_shared_layers(vla.backbone, None, Stream(tokens.x, tokens.positions), None,
                                     vla.shared_attention(layout, None))
    keep = tokens.valid[0]  # same for every sample here: drops the invalid (masked) state tokens
    normed, _ = vla.backbone.norm(hidden)
    return normed[:, keep], vla.logits(hidden)[:, keep]


def test_name_mapping_covers_both_hf_layouts():
    assert hf_to_megavla_name("vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight") == "vision.layers.3.mlp.fc1.weight"
    assert hf_to_megavla_name("vision_tower.embeddings.position_embedding.weight") == "vision.pos_embed"
    assert hf_to_megavla_name("model.vision_tower.vision_model.embeddings.patch_embedding.bias") == "vision.patch_embed.bias"
    assert hf_to_megavla_name("language_model.model.layers.17.self_attn.o_proj.weight") == "backbone.layers.17.self_attn.o_proj.weight"
    assert hf_to_megavla_name("model.language_model.norm.weight") == "backbone.norm.weight"
    assert hf_to_megavla_name("model.multi_modal_projector.linear.weight") == "projector.weight"
    assert hf_to_megavla_name("language_model.model.embed_tokens.weight") == "embed_tokens.weight"
    assert hf_to_megavla_name("something.else") is None


def test_paligemma_matches_hf_outputs(tmp_path):
    hf, path = tiny_paligemma(tmp_path)
    vla = _megavla(path)
    report = load_paligemma(vla, path)
    assert not report.missing and not report.unexpected
    assert any(n.startswith("expert.") for n in report.not_pretrained)
    assert any("[256, 260)" in note for note in report.notes)  # rows beyond text_vocab_size

    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 1, 3, 32, 32), dtype=torch.uint8, generator=gen)
    prompt = torch.randint(3, TEXT_VOCAB, (2, 5), generator=gen)
    suffix = torch.randint(3, TEXT_VOCAB, (2, 4), generator=gen)
    pixels = images[:, 0].float() * (2.0 / 255.0) - 1.0  # PaliGemma processor: mean 0.5, std 0.5

    with torch.no_grad():
        # Vision tower + projector.
        ref_img = hf.model.get_image_features(pixels).pooler_output
        ours_img = vla.projector(vla.vision(images[:, 0]))
        torch.testing.assert_close(ours_img, ref_img, atol=1e-4, rtol=1e-4)

        # Whole prefix-LM: [16 image tokens, prompt] bidirectional, suffix causal.
        n_img = ref_img.shape[1]
        ids = torch.cat([torch.full((2, n_img), IMAGE_TOKEN), prompt, suffix], dim=1)
        token_type = torch.cat([torch.zeros(2, n_img + 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long)], 1)
        kwargs = dict(input_ids=ids, pixel_values=pixels, token_type_ids=token_type,
                      attention_mask=torch.ones_like(ids))
        ref_hidden = hf.model(**kwargs).last_hidden_state
        ref_logits = hf(**kwargs).logits
        hidden, logits = _megavla_forward(vla, _batch(images, prompt), suffix)
    assert hidden.shape == ref_hidden.shape
    torch.testing.assert_close(hidden, ref_hidden, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[..., :TEXT_VOCAB], ref_logits[..., :TEXT_VOCAB], atol=1e-4, rtol=1e-4)
    # Not a vacuous match: an unloaded model is far off.
    fresh_hidden, _ = _megavla_forward(_megavla(path), _batch(images, prompt), suffix)
    assert (fresh_hidden - ref_hidden).abs().max() > 1e-2


def test_mismatched_model_is_reported(tmp_path):
    _, path = tiny_paligemma(tmp_path)
    deeper = _megavla(path, depth=3)
    with pytest.raises(PretrainedLoadError, match="missing"):
        load_paligemma(deeper, path)
    report = load_paligemma(deeper, path, strict=False)
    assert report.missing and all(n.startswith("backbone.layers.2.") for n in report.missing)
    with pytest.raises(PretrainedLoadError, match="paligemma_size_overrides"):
        load_paligemma(_megavla(path, mlp_dim=96), path)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_paligemma(deeper, tmp_path / "nope")


def _rewrite(src, dst, rename, extra=None):
    from safetensors.torch import load_file, save_file
    tensors = {rename(k): v for k, v in load_file(str(src / "model.safetensors")).items()}
    tensors.update(extra or {})
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return tensors


def test_hub_and_inmemory_layouts_load_the_same(tmp_path):
    """Hub checkpoints name the tower ``vision_tower.vision_model.*``; transformers>=4.52 in-memory
    state dicts use ``model.language_model.*`` / ``model.vision_tower.*`` and may carry lm_head."""
    _, path = tiny_paligemma(tmp_path)
    reference = _megavla(path)
    load_paligemma(reference, path)
    hub = tmp_path / "hub"
    _rewrite(path, hub, lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1))

    def inmemory(k):
        for old, new in (("language_model.model.", "model.language_model."),
                         ("vision_tower.", "model.vision_tower."),
                         ("multi_modal_projector.", "model.multi_modal_projector.")):
            if k.startswith(old):
                return new + k[len(old):]
        return k
    tensors = _rewrite(path, tmp_path / "mem", inmemory)
    embed = tensors["model.language_model.embed_tokens.weight"]
    (tmp_path / "mem" / "model.safetensors").unlink()
    from safetensors.torch import save_file
    save_file(dict(tensors, **{"lm_head.weight": embed.clone()}), str(tmp_path / "mem" / "model.safetensors"))
    for layout in (hub, tmp_path / "mem"):
        vla = _megavla(path)
        report = load_paligemma(vla, layout)
        assert not report.missing and not report.unexpected
        for name, p in reference.state_dict().items():
            if name.startswith(("vision.", "projector.", "embed_tokens.", "backbone.")):
                torch.testing.assert_close(vla.state_dict()[name], p, rtol=0, atol=0, msg=f"{layout.name}: {name}")
    # An untied head cannot be represented: refused (strict) or reported.
    untied = tmp_path / "untied"
    _rewrite(path, untied, lambda k: k, {"lm_head.weight": embed + 1.0})
    with pytest.raises(PretrainedLoadError, match="ties"):
        load_paligemma(_megavla(path), untied)
    assert any("ties" in n for n in load_paligemma(_megavla(path), untied, strict=False).notes)


def test_sparse_hub_config_gives_the_pi05_3b_backbone(tmp_path):
    """paligemma-3b-pt-224's config.json (its fields as published; sparse: SigLIP's image_size and
    Gemma's head_dim are implied defaults) must resolve to the sizes of the pi05-3b preset."""
    import json

    from megavla.model.presets import PRESETS
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "paligemma", "hidden_size": 2048, "projection_dim": 2048, "image_token_index": 257152,
        "vocab_size": 257216,
        "text_config": {"hidden_size": 2048, "intermediate_size": 16384, "model_type": "gemma",
                        "num_attention_heads": 8, "num_hidden_layers": 18, "num_image_tokens": 256,
                        "num_key_value_heads": 1, "vocab_size": 257216},
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                          "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256,
                          "patch_size": 14, "projection_dim": 2048, "vision_use_head": False}}))
    sizes = paligemma_size_overrides(tmp_path)
    preset = PRESETS["pi05-3b"]
    assert {k: v for k, v in sizes.items() if k in preset and k != "text_vocab_size"} == \
        {k: preset[k] for k in sizes if k in preset and k != "text_vocab_size"}
    assert sizes["text_vocab_size"] == 257216  # every pretrained row kept (preset: 257152)
