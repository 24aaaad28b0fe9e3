"""What the two checkpoint loaders share: pretrained.py (Hugging Face PaliGemma) and
pretrained_pi0.py (LeRobot / openpi π0, π0.5, whose VLM part is PaliGemma): the PaliGemma tensor
name map, the LoadReport and its strict-or-warn end, and writing one tensor into a parameter that
may be a ZeRO-3 partition. Below both, so that pretrained.load_pretrained can pick either loader
without the two importing each other.
"""
from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("megavla.model.pretrained")   # the loaders' log lines keep their logger


class PretrainedLoadError(ValueError):
    """The checkpoint does not fit the model: the message names the key, the shapes and the fix."""


# (regex over the canonical HF name, MegaVLA name template). Canonical = after _canonical().
_RULES: list[tuple[re.Pattern, str]] = [(re.compile(p), t) for p, t in [
    (r"vision\.embeddings\.patch_embedding\.(weight|bias)", r"vision.patch_embed.\1"),
    (r"vision\.embeddings\.position_embedding\.weight", "vision.pos_embed"),
    (r"vision\.encoder\.layers\.(\d+)\.(.+)", r"vision.layers.\1.\2"),
    (r"vision\.post_layernorm\.(weight|bias)", r"vision.post_layernorm.\1"),
    (r"projector\.linear\.(weight|bias)", r"projector.\1"),
    (r"lm\.embed_tokens\.weight", "embed_tokens.weight"),
    (r"lm\.layers\.(\d+)\.(.+)", r"backbone.layers.\1.\2"),
    (r"lm\.norm\.weight", "backbone.norm.weight"),
]]
_IGNORED = [(re.compile(r"vision\.head\..+"), "SigLIP pooling head (PaliGemma uses patch features)"),
            (re.compile(r"lm_head\.weight"), "output head (tied to embed_tokens in MegaVLA)")]
# Model parameters the checkpoint is expected to fill; the rest of the model is new.
PRETRAINED_SCOPE = ("vision.", "projector.", "embed_tokens.", "backbone.")
_PREFIXES = [  # HF layouts -> canonical short prefixes
    ("model.vision_tower.vision_model.", "vision."), ("model.vision_tower.", "vision."),
    ("vision_tower.vision_model.", "vision."), ("vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."), ("multi_modal_projector.", "projector."),
    ("language_model.model.", "lm."), ("model.language_model.", "lm."),
    ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."),
]


def _canonical(name: str) -> str | None:
    for prefix, short in _PREFIXES:
        if name.startswith(prefix):
            return short + name[len(prefix):]
    return None


def hf_to_megavla_name(name: str) -> str | None:
    """MegaVLA parameter name of an HF PaliGemma tensor name, or None if it has none."""
    canon = _canonical(name)
    if canon is None:
        return None
    for pattern, template in _RULES:
        if pattern.fullmatch(canon):
            return pattern.sub(template, canon)
    return None


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)  # MegaVLA parameter names filled
    missing: list[str] = field(default_factory=list)  # in PRETRAINED_SCOPE, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys with no MegaVLA home
    ignored: dict[str, str] = field(default_factory=dict)  # checkpoint key -> why it is not loaded
    not_pretrained: list[str] = field(default_factory=list)  # model parameters outside the scope
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"loaded {len(self.loaded)} tensors, missing {len(self.missing)}, unexpected "
                f"{len(self.unexpected)}, ignored {len(self.ignored)}, new (not pretrained) "
                f"{len(self.not_pretrained)}" + "".join(f"; {n}" for n in self.notes))

    def conclude(self, path: Any, *, strict: bool, what: str, fix: str, limit: int | None = None) -> "LoadReport":
        """End of a load: with ``strict``, missing or unexpected tensors raise PretrainedLoadError
        (names listed, the first ``limit`` of each when given; then ``fix``); else each is a warning."""
        def names(keys: list[str]) -> str:
            return f"{keys[:limit]}{'...' if len(keys) > limit else ''}" if limit is not None else f"{keys}"
        if strict and (self.missing or self.unexpected):
            raise PretrainedLoadError(f"{path}: {what} does not fit the model: missing {names(self.missing)} "
                                      f"({len(self.missing)}), unexpected {names(self.unexpected)} "
                                      f"({len(self.unexpected)}); {fix}")
        for key in self.unexpected:
            log.warning("pretrained: unexpected checkpoint key %s (not loaded)", key)
        for name in self.missing:
            log.warning("pretrained: %s not in the checkpoint (keeps its random init)", name)
        return self


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory (expected a Hugging Face "
                                "PaliGemma directory with *.safetensors; nothing is downloaded)")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files (convert .bin checkpoints with "
                                "transformers' save_pretrained(safe_serialization=True))")
    return files


def checkpoint_target(key: str, name: str | None, params: dict[str, nn.Parameter],
                      report: LoadReport) -> tuple[nn.Parameter, tuple[int, ...]] | None:
    """The model parameter checkpoint tensor ``key`` maps to (``name``, from a loader's name map) and its
    full shape (a ZeRO-3 partition's ``ds_shape``); None, recorded in ``report.unexpected``, when the
    name map or the model has no such parameter. One rule for every checkpoint loader."""
    if name is None or name not in params:
        report.unexpected.append(key if name is None else f"{key} (-> {name}, not in model)")
        return None
    param = params[name]
    return param, tuple(getattr(param, "ds_shape", param.shape))


def _whole(param: nn.Parameter):
    """The parameter whole while it is written: under ZeRO-3 (a zero.Init partition, ``ds_id``) it is
    gathered, written on every rank, and rank 0's values re-partitioned on exit -- one tensor at a
    time, so a rank never holds more than its partition plus the tensor being loaded. (Every rank
    walks the checkpoint in the same order: the gathers are collective.)"""
    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters([param], modifier_rank=0)


def _copy_embedding(param: nn.Parameter, tensor: torch.Tensor, key: str, text_vocab: int,
                    report: LoadReport) -> None:
    """Rows [0, n) of the text vocabulary; FAST rows and markers (above text_vocab) stay new."""
    if tensor.shape[1] != param.shape[1]:
        raise PretrainedLoadError(f"{key}: embedding width {tensor.shape[1]} != model width "
                                  f"{param.shape[1]}; set model.width={tensor.shape[1]}")
    rows = min(text_vocab, tensor.shape[0])
    with torch.no_grad():
        param[:rows].copy_(tensor[:rows].to(param.dtype))
    if tensor.shape[0] > rows:
        report.notes.append(f"embedding rows [{rows}, {tensor.shape[0]}) of the checkpoint not loaded "
                            f"(beyond model.text_vocab_size={text_vocab})")
    if rows < text_vocab:
        report.notes.append(f"text rows [{rows}, {text_vocab}) not in the checkpoint (random init)")
