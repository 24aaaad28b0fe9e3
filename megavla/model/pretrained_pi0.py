"""Load LeRobot / openpi π0.5 and π0 PyTorch checkpoints into MegaVLA.

    from megavla.model.pretrained_pi0 import is_pi0_checkpoint, load_pi0, pi0_size_overrides
    cfg = ModelConfig(preset="pi05-3b", **pi0_size_overrides(ckpt_dir))   # sizes from the tensors
    model = build_model(cfg)
    report = load_pi0(model, ckpt_dir)     # before deepspeed.initialize (ZeRO-3: one tensor at a time)

Accepted layouts: a LeRobot ``PI05Policy`` / ``PI0Policy`` directory as ``save_pretrained`` writes it
(``config.json`` with ``"type": "pi05" | "pi0"`` + ``model.safetensors``, names ``model.<...>``) and
an openpi PyTorch checkpoint (the same tensors without the ``model.`` prefix). Mapping (after
dropping ``model.`` and ``paligemma_with_expert.``)::

    paligemma.{model.,}vision_tower.* / multi_modal_projector.* / language_model.layers|norm.*
                                               -> vision.* / projector.* / backbone.*  (PaliGemma rules)
    paligemma.lm_head.weight (tied; the only copy LeRobot saves)  -> embed_tokens rows [0, vocab)
    gemma_expert.model.layers.{i}.<rest>       -> expert.stack.layers.{i}.<rest>  (adaRMS .dense / .weight)
    gemma_expert.model.norm.dense.*            -> expert.stack.norm.dense.* : rows [0, 2W) = scale, shift;
                                                  rows [2W, 3W) = a gate both models ignore (reported)
    gemma_expert.model.norm.weight (π0)        -> expert.stack.norm.weight
    action_in_proj / action_out_proj / time_mlp_in|out (π0.5) / action_time_mlp_in|out + state_proj (π0)
                                               -> expert.<same>
    gemma_expert.lm_head.weight                -> not loaded: the expert has no vocabulary (reported)

Strict like the PaliGemma loader (shared machinery in pretrained.py): every model parameter outside
the "new on purpose" set must be filled, every checkpoint tensor must have a home, else
``PretrainedLoadError`` lists them. New on purpose: FAST rows / markers of ``embed_tokens`` (rows
above the checkpoint vocabulary) and nothing else -- π0.5 reads its state as prompt text
(``model.state_mode=text``), π0 through ``state_proj`` (``state_mode=continuous``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .pretrained_common import (LoadReport, PretrainedLoadError, _copy_embedding, _safetensors_files, _whole,
                                checkpoint_target, hf_to_megavla_name)

log = logging.getLogger(__name__)

# SigLIP So400m's head count: LeRobot and openpi build the tower from transformers' PaliGemma default
# and never store it (head count is not visible in tensor shapes).
SIGLIP_HEADS = 16
_PREFIX = "paligemma_with_expert."
_EXPERT_RULES = [(re.compile(p), t) for p, t in [
    (r"gemma_expert\.model\.layers\.(\d+)\.(.+)", r"expert.stack.layers.\1.\2"),
    (r"gemma_expert\.model\.norm\.(weight|dense\.weight|dense\.bias)", r"expert.stack.norm.\1"),
    (r"(action_in_proj|action_out_proj|time_mlp_in|time_mlp_out|action_time_mlp_in|action_time_mlp_out"
     r"|state_proj)\.(weight|bias)", r"expert.\1.\2"),
]]
_IGNORED = {"gemma_expert.lm_head.weight": "action expert's LM head (the expert reads no tokens; unused)"}


def _short(key: str) -> str:
    key = key[len("model."):] if key.startswith("model.") else key
    return key[len(_PREFIX):] if key.startswith(_PREFIX) else key


def _weight_files(path: Path) -> list[Path]:
    """``model.safetensors`` of a policy directory (LeRobot keeps its normalizer statistics as other
    *.safetensors files beside it), else every *.safetensors file (openpi, sharded exports)."""
    path = Path(path)
    if path.is_dir() and (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    return _safetensors_files(path)


def _keys_and_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    out = {}
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                out[key] = tuple(f.get_slice(key).get_shape())
    return out


def is_pi0_checkpoint(path: str | Path) -> bool:
    """A LeRobot / openpi π0 or π0.5 checkpoint (config type, else its tensor names)?"""
    path = Path(path)
    cfg = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if cfg.is_file():
        with contextlib.suppress(ValueError, OSError):   # unreadable config: judge by the tensors
            if json.loads(cfg.read_text()).get("type") in ("pi0", "pi05"):
                return True
    try:
        return any(_short(k).startswith(("paligemma.", "gemma_expert.")) for k in _keys_and_shapes(path))
    except FileNotFoundError:
        return False


def pi0_variant(shapes: dict[str, tuple[int, ...]]) -> str:
    short = {_short(k) for k in shapes}
    if "time_mlp_in.weight" in short:
        return "pi05"
    if "action_time_mlp_in.weight" in short:
        return "pi0"
    raise PretrainedLoadError("checkpoint has neither time_mlp_in (π0.5) nor action_time_mlp_in (π0): "
                              "not a LeRobot / openpi π0 checkpoint")


def pi0_size_overrides(path: str | Path) -> dict[str, Any]:
    """ModelConfig fields of a π0 / π0.5 checkpoint, read from its tensor shapes (LeRobot's config.json
    names Gemma variants, not sizes) and its config.json (chunk_size) where present."""
    path = Path(path)
    out = pi0_sizes_from_shapes({k: v for k, v in _keys_and_shapes(path).items()}, str(path))
    cfg = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if cfg.is_file():
        chunk = json.loads(cfg.read_text()).get("chunk_size")
        if isinstance(chunk, int) and chunk > 0:
            out["chunk_length"] = chunk
    return out


def pi0_sizes_from_shapes(shapes: dict[str, tuple[int, ...]], path: str = "checkpoint") -> dict[str, Any]:
    """ModelConfig fields from {checkpoint tensor name: shape} (either layout)."""
    shapes = {_short(k): tuple(v) for k, v in shapes.items()}
    variant = pi0_variant(shapes)

    def shape(*names: str) -> tuple[int, ...]:
        for name in names:
            if name in shapes:
                return shapes[name]
        raise PretrainedLoadError(f"{path}: no tensor {names[0]}; not a complete π0 checkpoint")

    def depth(prefix: str) -> int:
        ids = {int(m.group(1)) for k in shapes for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
        return max(ids) + 1 if ids else 0

    vt = "paligemma.model.vision_tower.vision_model." if any(
        k.startswith("paligemma.model.vision_tower.") for k in shapes) else "paligemma.vision_tower.vision_model."
    lm = "paligemma.model.language_model." if any(
        k.startswith("paligemma.model.language_model.") for k in shapes) else "paligemma.language_model.model."
    patch = shape(vt + "embeddings.patch_embedding.weight")
    patches = shape(vt + "embeddings.position_embedding.weight")[0]
    q, k = shape(lm + "layers.0.self_attn.q_proj.weight"), shape(lm + "layers.0.self_attn.k_proj.weight")
    eq, ek = (shape(f"gemma_expert.model.layers.0.self_attn.{p}_proj.weight") for p in ("q", "k"))
    # openpi's Gemma variants are all multi-query (1 KV head): head_dim = K rows
    head_dim = k[0]
    if eq[0] != q[0] or ek[0] != k[0]:
        raise PretrainedLoadError(f"{path}: expert attention {eq}/{ek} differs from the backbone's {q}/{k}; "
                                  "MegaVLA's expert shares heads and head_dim with the backbone")
    grid = round(patches ** 0.5)
    out = dict(
        image_size=grid * patch[2], patch_size=patch[2], vision_width=patch[0], vision_depth=depth(vt + "encoder.layers."),
        vision_heads=SIGLIP_HEADS, vision_mlp_dim=shape(vt + "encoder.layers.0.mlp.fc1.weight")[0],
        width=q[1], depth=depth(lm + "layers."), num_heads=q[0] // head_dim, num_kv_heads=1, head_dim=head_dim,
        mlp_dim=shape(lm + "layers.0.mlp.gate_proj.weight")[0],
        expert_width=eq[1], expert_mlp_dim=shape("gemma_expert.model.layers.0.mlp.gate_proj.weight")[0],
        text_vocab_size=shape("paligemma.lm_head.weight", lm + "embed_tokens.weight")[0],
        action_dim=shape("action_in_proj.weight")[1],
        time_conditioning="adarms" if variant == "pi05" else "mlp",
        state_mode="text" if variant == "pi05" else "continuous",
        action_conditioning="instruction",   # public π0 / π0.5 weights have no subtask head
    )
    if variant == "pi0":
        out["state_dim"] = shape("state_proj.weight")[1]
    return out


def pi0_to_megavla_name(key: str) -> str | None:
    """MegaVLA parameter name of a LeRobot / openpi π0 tensor (None: no home)."""
    short = _short(key)
    if short == "paligemma.lm_head.weight":
        return "embed_tokens.weight"
    if short.startswith("paligemma."):
        return hf_to_megavla_name(short[len("paligemma."):])
    for pattern, template in _EXPERT_RULES:
        if pattern.fullmatch(short):
            return pattern.sub(template, short)
    return None


def _overrides_hint(path: Path) -> str:
    try:
        sizes = pi0_size_overrides(path)
    except PretrainedLoadError:
        return ""
    return " (pass " + " ".join(f"model.{k}={v}" for k, v in sizes.items()) + ")"


def load_pi0(model: nn.Module, path: str | Path, strict: bool = True) -> LoadReport:
    """Copy a π0 / π0.5 checkpoint into ``model`` (a VLA built with ``pi0_size_overrides``). Tensors
    are read one at a time and, under ZeRO-3, written one gathered parameter at a time (every rank)."""
    path = Path(path)
    params = dict(model.named_parameters())
    report, filled = LoadReport(), set()
    embeds: list[tuple[str, torch.Tensor]] = []
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                short = _short(key)
                if short in _IGNORED:
                    report.ignored[key] = _IGNORED[short]
                    continue
                name = pi0_to_megavla_name(key)
                target = checkpoint_target(key, name, params, report)
                if target is None:
                    continue
                param, shape = target
                tensor = f.get_tensor(key)
                if name == "expert.stack.norm.dense.weight" or name == "expert.stack.norm.dense.bias":
                    if tensor.shape[0] == 3 * shape[0] // 2:   # (scale, shift, gate): the final norm's gate is unused
                        tensor = tensor[:shape[0]]
                        report.notes.append(f"{key}: gate rows [{shape[0]}, {3 * shape[0] // 2}) not loaded "
                                            "(the final norm's gate is unused in LeRobot/openpi and MegaVLA)")
                if name != "embed_tokens.weight" and tuple(tensor.shape) != shape:
                    raise PretrainedLoadError(f"{file}:{key} has shape {tuple(tensor.shape)} but MegaVLA's {name} "
                                              f"is {shape}; build the model from the checkpoint's sizes"
                                              f"{_overrides_hint(path)}")
                with _whole(param), torch.no_grad():
                    if name == "embed_tokens.weight":
                        embeds.append((key, tensor))
                        if len(embeds) == 1:
                            _copy_embedding(param, tensor, key, int(getattr(model, "fast_offset", shape[0])), report)
                    else:
                        param.copy_(tensor.to(param.dtype))
                filled.add(name)
                del tensor
    if len(embeds) > 1 and not torch.equal(embeds[0][1], embeds[1][1]):
        msg = f"{embeds[0][0]} and {embeds[1][0]} differ; MegaVLA ties its embedding and output head"
        if strict:
            raise PretrainedLoadError(f"{path}: {msg}")
        report.notes.append(msg + f" ({embeds[0][0]} loaded)")
    vocab = getattr(model, "vocab_size", None)
    if embeds and vocab is not None and vocab > embeds[0][1].shape[0]:
        report.notes.append(f"embed_tokens rows [{embeds[0][1].shape[0]}, {vocab}) (FAST ids, FAST_END and the "
                            "two start markers) are new: random init")
    report.loaded = sorted(filled)
    report.missing = sorted(n for n in params if n not in filled)
    report.conclude(path, strict=strict, what="π0 checkpoint", fix=(
        f"build the model from the checkpoint's sizes{_overrides_hint(path)} or pass strict=False to load what fits"))
    log.info("pretrained π0 %s: %s", path, report.summary())
    return report


def convert_pi0(src: str | Path, out: str | Path, overrides: list[str] | None = None,
                overwrite: bool = False) -> tuple[Path, LoadReport]:
    """``megavla model convert``: a π0 / π0.5 checkpoint -> a MegaVLA model directory (``model.safetensors``
    + ``model_config.yaml``, what ``megavla.model.io.load_model`` reads). Sizes come from the checkpoint;
    ``overrides`` (dotted, e.g. ``model.preset=pi05-3b``) set the rest; the load is strict."""
    from megavla.config import load_config

    from .flops import model_config_of
    from .io import WEIGHTS_FILE, save_model
    from .vla import build_model
    src, out = Path(src), Path(out)
    if not is_pi0_checkpoint(src):
        raise PretrainedLoadError(f"{src}: not a LeRobot / openpi π0 or π0.5 checkpoint (expected config.json "
                                  "with type pi05 / pi0, or model.safetensors with paligemma_with_expert.* "
                                  "tensors); PaliGemma directories go to train.pretrained directly")
    if (out / WEIGHTS_FILE).exists() and not overwrite:
        raise FileExistsError(f"{out / WEIGHTS_FILE} exists; pass --overwrite to replace it")
    sizes = [f"model.{k}={v}" for k, v in pi0_size_overrides(src).items()]
    cfg = load_config(None, ["model.preset=pi05-3b"] + sizes + list(overrides or []))
    model = build_model(model_config_of(cfg))
    report = load_pi0(model, src, strict=True)
    save_model(model, out)
    return out, report
