"""Checks across config sections: what the model, data and train sections must agree on.

Each section's ``validate()`` (core.build) sees only its own fields. A run also needs them to fit each
other, or it fails minutes later, after the job was submitted and the model built:

* model vs data (the model's preset filled in, megavla.model.presets.resolve): image size, action
  chunk length, action and state dims. A mismatch fails the first forward (images, action / state
  projections) or trains on the wrong chunk.
* model vs tokenizers (``train.tokenizer_dir``, when it exists): token ids beyond the model's text or
  FAST vocabulary would index into the wrong embedding rows.
* model.state_mode=text (π0.5 reads the state only as prompt text, megavla.data.prompt): the run
  needs a text tokenizer, a normalized state (the 256 bins cover [-1, 1]), and a ``model.text_len``
  (the prompt length the FLOPs estimate counts; nothing truncates a prompt) that holds the prompt.
* data vs the shard sets (``data.sources`` / ``data.val_sources``, when they exist): frames stored
  smaller than ``data.image_size`` would be upscaled (the pipeline only ever downscales by design:
  an upscaled frame costs compute and carries no detail); an embodiment whose dims exceed
  ``data.max_*_dim`` would have every one of its episodes skipped.

:func:`config_problems` lists every problem (key, message with values and fix); :func:`check_config`
raises one ConfigError with all of them. `megavla train`, `megavla launch` and `megavla sweep` call it
before anything starts (a sweep: for every run before it submits any). The model-vs-data part runs
earlier too, at load time (:func:`check_loaded`, from megavla.config.load_config), for every config
that names shard sets, whichever entry point loads it. Cameras need no check here:
a camera a set lacks is masked, and ``model.num_cameras`` only sizes the FLOPs estimate.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .core import ConfigError

log = logging.getLogger(__name__)

TOKENIZER_SUMMARY = "tokenizers.json"   # megavla.tokenizers.pair.SUMMARY_FILE (torch-free copy)
TEXT_TOKENIZER_FILE = "text.model"      # megavla.tokenizers.pair.TEXT_FILE
NORM_STATS_FILE = "norm_stats.json"     # megavla.data_shards.stats.NORM_STATS_FILE


@dataclass(frozen=True)
class Problem:
    key: str       # the dotted key to change, e.g. "data.image_size"
    message: str   # values, consequence and fix

    def __str__(self) -> str:
        return self.message


def model_data_problems(cfg: Any) -> list[Problem]:
    """Model sizes (preset resolved) against the data section's."""
    from megavla.model.presets import resolve   # imports torch: only when a check runs
    try:
        model = resolve(cfg.model)
    except ConfigError as e:
        return [Problem("model", str(e))]
    data = cfg.data
    preset = f" (preset {model.preset})" if cfg.model.image_size is None else ""
    problems = []
    if model.image_size != data.image_size:
        fix = f"set data.image_size={model.image_size} (frames are resized to it)"
        if data.image_size % model.patch_size == 0:
            fix += f" or model.image_size={data.image_size}"
        problems.append(Problem("data.image_size", (
            f"model.image_size={model.image_size}{preset} but data.image_size={data.image_size}: the first "
            f"forward would refuse {data.image_size} px batches; {fix}")))
    pairs = [("chunk_length", "chunk_length", "action chunk length"),
             ("action_dim", "max_action_dim", "action dims"), ("state_dim", "max_state_dim", "state dims")]
    for m_key, d_key, what in pairs:
        m_value, d_value = getattr(model, m_key), getattr(data, d_key)
        if m_value != d_value:
            problems.append(Problem(f"model.{m_key}", (
                f"model.{m_key}={m_value} but data.{d_key}={d_value}: the model's {what} must equal the "
                f"batches'; set model.{m_key}={d_value} (or data.{d_key}={m_value})")))
    return problems


def tokenizer_problems(cfg: Any) -> list[Problem]:
    """Vocabularies in ``train.tokenizer_dir/tokenizers.json`` against the model's."""
    tok_dir = cfg.train.tokenizer_dir
    path = Path(tok_dir) / TOKENIZER_SUMMARY if tok_dir else None
    if path is None or not path.is_file():
        return []   # no tokenizers, or a missing dir (the path checks name it)
    try:
        summary = json.loads(path.read_text())
        vocab = {"text": int(summary["text"]["vocab_size"]), "fast": int(summary["fast"]["vocab_size"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: cannot read the tokenizer vocab sizes (%s); not checked against the model", path, e)
        return []
    from megavla.model.presets import resolve
    try:
        model = resolve(cfg.model)
    except ConfigError:
        return []   # model_data_problems reports it
    problems = []
    for kind, model_key in (("text", "text_vocab_size"), ("fast", "fast_vocab_size")):
        if vocab[kind] > getattr(model, model_key):
            problems.append(Problem(f"model.{model_key}", (
                f"train.tokenizer_dir={tok_dir}: the {kind} tokenizer has {vocab[kind]} tokens but "
                f"model.{model_key}={getattr(model, model_key)} (preset {model.preset}): larger ids would "
                f"index the wrong embedding rows; set model.{model_key}={vocab[kind]} or train the "
                f"tokenizer with --{kind}-vocab {getattr(model, model_key)}")))
    return problems


def state_prompt_problems(cfg: Any, read_files: bool = True) -> list[Problem]:
    """``model.state_mode=text``: tokenizer, normalization and ``model.text_len`` for the state prompt;
    ``read_files``: tokenize the shortest-case prompt with ``train.tokenizer_dir``'s text tokenizer."""
    from megavla.model.presets import resolve
    try:
        model = resolve(cfg.model)
    except ConfigError:
        return []   # model_data_problems reports it
    if model.state_mode != "text":
        return []
    tok_dir, data = cfg.train.tokenizer_dir, cfg.data
    problems = []
    if data.normalization == "none":
        problems.append(Problem("data.normalization", (
            "model.state_mode=text writes the state as 256 bins over [-1, 1] (π0.5's prompt) but "
            "data.normalization=none leaves it raw: most values would fall in the end bins; set "
            "data.normalization=quantile (π0.5's q01..q99 -> [-1, 1])")))
    if not tok_dir:
        return problems + [Problem("train.tokenizer_dir", (
            "model.state_mode=text reads the state only as prompt text, and without train.tokenizer_dir "
            "there are no text tokens: the model would see neither state nor instruction; set "
            "train.tokenizer_dir (for a loaded π0.5 with PaliGemma's tokenizer, docs/architecture.md) or "
            "model.state_mode=continuous"))]
    text_file = Path(tok_dir) / TEXT_TOKENIZER_FILE
    if not read_files or not text_file.is_file():
        return problems   # a missing dir: the path checks name it
    import numpy as np

    from megavla.data.prompt import pi05_prompt
    from megavla.tokenizers.text import TextTokenizer
    try:
        tok = TextTokenizer.load(text_file)
    except (OSError, ValueError) as e:
        log.warning("%s: cannot read the text tokenizer (%s); model.text_len not checked", text_file, e)
        return problems
    # An empty instruction and a centred state (bin 128 in every dim, what every padded dim holds):
    # real prompts add their instruction; only states with many 1- or 2-digit bins are shorter.
    least = len(tok.encode(pi05_prompt("", np.zeros(data.max_state_dim, np.float32)), add_bos=True, add_eos=False))
    if model.text_len < least:
        problems.append(Problem("model.text_len", (
            f"model.state_mode=text: the prompt of an empty instruction and a centred state of "
            f"data.max_state_dim={data.max_state_dim} dims is already {least} tokens with {text_file}, but "
            f"model.text_len={model.text_len} (the prompt length the FLOPs estimate counts; prompts are "
            f"never cut): set model.text_len to at least {least} plus your instructions' tokens "
            f"(LeRobot's π0.5: 200)")))
    return problems


def _stored_image_size(manifest: dict) -> int | None:
    size = (manifest.get("generator") or {}).get("image_size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def _stats_dims(set_dir: Path) -> dict[str, dict[str, int]]:
    """{embodiment: {"state": S, "actions": A}} from norm_stats.json ({} when absent/unreadable:
    the reader's own set checks report that)."""
    try:
        stats = json.loads((set_dir / NORM_STATS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    dims = {}
    for emb, entry in stats.items() if isinstance(stats, dict) else ():
        try:
            dims[emb] = {kind: len(entry[kind]["mean"]) for kind in ("state", "actions")}
        except (KeyError, TypeError):
            continue   # not an embodiment's stats
    return dims


def shard_set_problems(cfg: Any) -> list[Problem]:
    """data.* against what each existing source's manifest and norm stats say."""
    from megavla.data_shards.manifest import ManifestError, load_manifest
    data = cfg.data
    problems = []
    for field in ("sources", "val_sources"):
        for name, directory in getattr(data, field).items():
            set_dir = Path(directory)
            if not (set_dir / "manifest.json").is_file():
                continue   # the path checks / the reader's set checks name a missing set
            try:
                manifest = load_manifest(set_dir)
            except ManifestError:
                continue   # check_shard_set reports it with its fix
            stored = _stored_image_size(manifest)
            if stored is not None and stored < data.image_size:
                problems.append(Problem(f"data.{field}.{name}", (
                    f"data.{field}.{name}={directory} stores {stored} px frames (manifest generator."
                    f"image_size) but data.image_size={data.image_size}: they would be upscaled "
                    f"{data.image_size / stored:.3g}x; write the set at --image-size {data.image_size} "
                    f"(megavla data synth / import), or set data.image_size={stored} and "
                    f"model.image_size={stored}")))
            for emb, dims in sorted(_stats_dims(set_dir).items()):
                for kind, limit_key in (("state", "max_state_dim"), ("actions", "max_action_dim")):
                    if dims[kind] > getattr(data, limit_key):
                        problems.append(Problem(f"data.{limit_key}", (
                            f"data.{field}.{name}={directory}: {emb} has {dims[kind]} {kind.rstrip('s')} dims "
                            f"({NORM_STATS_FILE}) but data.{limit_key}={getattr(data, limit_key)}: every "
                            f"{emb} episode would be skipped; set data.{limit_key}={dims[kind]} and "
                            f"model.{'state_dim' if kind == 'state' else 'action_dim'}={dims[kind]}")))
    return problems


def config_problems(cfg: Any, read_files: bool = True) -> list[Problem]:
    """Every cross-section problem of a built Config; ``read_files`` also reads the tokenizer summary
    and the sources' manifests / norm stats where they exist."""
    problems = model_data_problems(cfg) + state_prompt_problems(cfg, read_files)
    if read_files:
        problems += tokenizer_problems(cfg) + shard_set_problems(cfg)
    return problems


def _raise(problems: list[Problem]) -> None:
    if len(problems) == 1:
        raise ConfigError(problems[0].message)
    if problems:
        raise ConfigError(f"{len(problems)} problems:\n" + "\n".join(f"  {p.message}" for p in problems))


def check_config(cfg: Any, read_files: bool = True) -> None:
    """Raise one ConfigError naming every problem of :func:`config_problems` (one per line)."""
    _raise(config_problems(cfg, read_files))


def check_loaded(cfg: Any) -> None:
    """The load-time check (megavla.config.load_config): model vs data sizes of a config that names
    shard sets (``data.sources`` / ``data.val_sources``), so every entry point refuses a mismatch
    before a process starts. Without shard sets the data section shapes nothing (the trainer refuses
    to start; tests' toy loaders make batches of the model's sizes), so a tree loaded for its model or
    launch section alone is not held to it. Reads no files: the tokenizer and shard-set checks stay
    in :func:`check_config`, which `megavla train` / `launch` / `sweep` run before they start."""
    if cfg.data.sources or cfg.data.val_sources:
        _raise(model_data_problems(cfg))
