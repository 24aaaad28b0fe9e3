"""Load PaliGemma (SigLIP + Gemma) weights from a local Hugging Face safetensors directory.

    from megavla.model.pretrained import load_paligemma, paligemma_size_overrides
    cfg = ModelConfig(preset="pi05-3b", **paligemma_size_overrides(hf_dir))   # optional: sizes from config.json
    model = build_model(cfg)
    report = load_paligemma(model, hf_dir)     # before deepspeed.initialize (ZeRO-3 partitions params)

What is loaded (HF name -> MegaVLA name; see the module tree in vla.py):

    vision_tower[.vision_model].embeddings.patch_embedding      -> vision.patch_embed
    vision_tower[.vision_model].embeddings.position_embedding   -> vision.pos_embed
    vision_tower[.vision_model].encoder.layers.{i}.<rest>       -> vision.layers.{i}.<rest>
    vision_tower[.vision_model].post_layernorm                  -> vision.post_layernorm
    multi_modal_projector.linear                                -> projector
    language_model[.model].embed_tokens  (rows [0, text_vocab)) -> embed_tokens
    language_model[.model].layers.{i}.<rest>                    -> backbone.layers.{i}.<rest>
    language_model[.model].norm                                 -> backbone.norm

Both checkpoint layouts are read: the Hub / ``save_pretrained`` layout (``language_model.model.*``,
``vision_tower.vision_model.*``) and the in-memory transformers>=4.52 names (``model.language_model.*``).

Not loaded, on purpose, and listed in the report:
* ``lm_head.weight``: MegaVLA ties its output head to ``embed_tokens`` (as PaliGemma does); a
  checkpoint whose head differs from its embedding is refused (strict) or warned about.
* ``vision_tower.head.*``: SigLIP's attention-pooling head; PaliGemma uses the unpooled patch
  features and so does MegaVLA.
* Embedding rows beyond ``text_vocab_size`` (PaliGemma: 257216 rows, of which the last 64 pad the
  table past the 257152-token Gemma + location + segmentation vocabulary); MegaVLA's FAST rows and
  its two start markers are new and keep their random init, as does everything outside the
  backbone (action expert, state embedding).

Anything else in the checkpoint is *unexpected*; any backbone parameter the checkpoint does not
fill is *missing*; a shape mismatch names both shapes and the config field to change. With
``strict=True`` (default) unexpected or missing keys raise ``PretrainedLoadError``.

Numerics: MegaVLA's math is Hugging Face's (vision.py, gemma.py), so in fp32 the loaded model's
image features and LM hidden states match ``PaliGemmaForConditionalGeneration`` (tests/test_pretrained.py).
Two conventions differ without changing any number: HF PaliGemma counts RoPE positions from 1,
MegaVLA from 0 (RoPE attention depends only on position differences); HF takes float pixels
normalized with mean 0.5 / std 0.5, MegaVLA takes uint8 and maps x -> 2x/255 - 1 (the same values).
PaliGemma 2 (Gemma 2 backbone: extra norms, soft-capping) is a different architecture and refused.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

# What the PaliGemma and the π0 loaders share (the name map, the report, ZeRO-3-safe writes); the
# names stay importable from here, where callers have always found them.
from .pretrained_common import (PRETRAINED_SCOPE, _IGNORED, LoadReport, PretrainedLoadError, checkpoint_target,  # noqa: F401
                                _canonical, _copy_embedding, _safetensors_files, _whole, hf_to_megavla_name)

log = logging.getLogger(__name__)


def read_hf_config(path: str | Path) -> dict[str, Any]:
    cfg_path = Path(path) / "config.json" if Path(path).is_dir() else Path(path).parent / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing; the PaliGemma directory needs its config.json")
    return json.loads(cfg_path.read_text())


def _resolved_hf_config(path: str | Path) -> dict[str, Any]:
    """config.json with transformers' defaults filled in when transformers is installed (Hub
    configs omit fields that equal a default, e.g. SigLIP's image_size); the raw JSON otherwise."""
    raw = read_hf_config(path)
    try:
        from transformers import PaliGemmaConfig
    except ImportError:
        return raw
    if raw.get("model_type") != "paligemma":
        return raw
    cfg = PaliGemmaConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "architectures")})
    resolved = cfg.to_dict()
    resolved["text_config"] = cfg.text_config.to_dict()
    resolved["vision_config"] = cfg.vision_config.to_dict()
    return resolved


def paligemma_size_overrides(path: str | Path) -> dict[str, Any]:
    """ModelConfig size fields read from a PaliGemma ``config.json`` (use with any preset)."""
    hf = _resolved_hf_config(path)
    text, vision = hf.get("text_config", {}), hf.get("vision_config", {})
    if hf.get("model_type") != "paligemma" or text.get("model_type", "gemma") != "gemma":
        raise PretrainedLoadError(f"{path}: model_type={hf.get('model_type')!r} with text model "
                                  f"{text.get('model_type')!r}; only PaliGemma 1 (Gemma 1 backbone) is supported")
    for part, fields in (("vision_config", ("image_size", "patch_size", "hidden_size", "num_hidden_layers",
                                            "num_attention_heads", "intermediate_size")),
                         ("text_config", ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                          "intermediate_size", "vocab_size"))):
        missing = [f for f in fields if f not in hf.get(part, {})]
        if missing:
            raise PretrainedLoadError(f"{path}/config.json: {part} lacks {missing}; add them (or install "
                                      "transformers, which fills PaliGemma's defaults)")
    act = text.get("hidden_activation") or text.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise PretrainedLoadError(f"{path}: text activation {act!r}; MegaVLA's GeGLU is gelu(tanh)")
    rope = (text.get("rope_parameters") or {}).get("rope_theta", text.get("rope_theta", 10000.0))
    heads = text["num_attention_heads"]
    return dict(
        image_size=vision["image_size"], patch_size=vision["patch_size"],
        vision_width=vision["hidden_size"], vision_depth=vision["num_hidden_layers"],
        vision_heads=vision["num_attention_heads"], vision_mlp_dim=vision["intermediate_size"],
        width=text["hidden_size"], depth=text["num_hidden_layers"], num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads", heads),
        head_dim=text.get("head_dim") or text["hidden_size"] // heads,
        mlp_dim=text["intermediate_size"], rope_theta=float(rope),
        # The whole embedding table (PaliGemma: 257216 rows = 257152 tokens + the <image> id and
        # padding): every pretrained row is kept; the presets' 257152 drops the unused 64.
        text_vocab_size=int(text["vocab_size"]),
    )


def load_paligemma(model: nn.Module, path: str | Path, strict: bool = True) -> LoadReport:
    """Copy PaliGemma weights from ``path`` (dir of *.safetensors, or one file) into ``model`` (a VLA).

    Tensors are read one at a time (a 3B checkpoint never sits twice in memory) and cast to each
    parameter's dtype; a model built under DeepSpeed's zero.Init (ZeRO-3) is filled one gathered
    parameter at a time (see _whole): call it on every rank. Returns a LoadReport; logs its summary.
    """
    path = Path(path)
    params = dict(model.named_parameters())
    report = LoadReport()
    filled: set[str] = set()
    head: torch.Tensor | None = None
    embed: torch.Tensor | None = None
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                canon = _canonical(key) or key
                why = next((w for p, w in _IGNORED if p.fullmatch(canon)), None)
                if why is not None:
                    report.ignored[key] = why
                    if canon == "lm_head.weight":
                        head = f.get_tensor(key)
                    continue
                name = hf_to_megavla_name(key)
                target = checkpoint_target(key, name, params, report)
                if target is None:
                    continue
                param, shape = target
                tensor = f.get_tensor(key)
                if name != "embed_tokens.weight" and tuple(tensor.shape) != shape:
                    raise PretrainedLoadError(
                        f"{file}:{key} has shape {tuple(tensor.shape)} but MegaVLA's {name} is "
                        f"{shape}; build the model with paligemma_size_overrides({str(path)!r})")
                with _whole(param), torch.no_grad():
                    if name == "embed_tokens.weight":
                        embed = tensor
                        # rows above the text vocabulary are FAST ids + markers (VLA.fast_offset)
                        text_vocab = int(getattr(model, "fast_offset", shape[0]))
                        _copy_embedding(param, tensor, key, text_vocab, report)
                    else:
                        param.copy_(tensor.to(param.dtype))
                del tensor
                filled.add(name)
    report.loaded = sorted(filled)
    report.missing = sorted(n for n in params if n.startswith(PRETRAINED_SCOPE) and n not in filled)
    report.not_pretrained = sorted(n for n in params if not n.startswith(PRETRAINED_SCOPE))
    if head is not None and embed is not None and not (head.shape == embed.shape and torch.equal(head, embed)):
        msg = "checkpoint lm_head.weight differs from its embed_tokens; MegaVLA ties them (head not loaded)"
        if strict:
            raise PretrainedLoadError(f"{path}: {msg}")
        report.notes.append(msg)
    report.conclude(path, strict=strict, what="checkpoint", fix="pass strict=False to load what fits", limit=5)
    log.info("pretrained %s: %s", path, report.summary())
    return report


def load_pretrained(model: nn.Module, path: str | Path, strict: bool = True) -> LoadReport:
    """``train.pretrained``: a LeRobot / openpi π0 or π0.5 checkpoint (pretrained_pi0.load_pi0: every
    tensor, expert included) or a Hugging Face PaliGemma directory (load_paligemma: the VLM part)."""
    from .pretrained_pi0 import is_pi0_checkpoint, load_pi0
    if is_pi0_checkpoint(path):
        return load_pi0(model, path, strict=strict)
    return load_paligemma(model, path, strict=strict)
