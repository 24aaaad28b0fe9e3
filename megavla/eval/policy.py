"""A trained VLA as a mini-world policy: checkpoint -> actions for the world's current observation.

Loading (:func:`load_checkpoint`) accepts a run directory (its newest loadable checkpoint), one
checkpoint directory (``step_NNNNNN`` with DeepSpeed's ``mp_rank_00_model_states.pt``,
``trainer_state.json``, ``norm_stats.json``, ``tokenizers/``) or an exported directory
(``model.safetensors`` + ``model_config.yaml`` from megavla.model.io, with ``norm_stats.json`` and
``tokenizers/`` beside it, plus ``config.yaml`` for the data settings).
A checkpoint of a run trained with ``train.ema_decay`` also holds ``ema.safetensors``; the EMA
weights are then the ones evaluated and served (``weights="auto"``, as openpi serves its EMA params),
unless ``weights="raw"`` asks for the optimizer's own.

Observations go through the training path: the world's renders are JPEG-encoded as the generator
stores them and turned into a one-step ``Episode``, then ``data.collate.build_sample`` +
``collate_samples`` build the Batch (same cameras, normalization, text tokens as in training).
Action chunking: ``sample_actions`` predicts H normalized steps; the first ``execute_k`` are
unnormalized and executed before the policy is queried again.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megavla.batch import Batch
from megavla.config import Config, build, load_config
from megavla.data.collate import build_sample, collate_samples
from megavla.data.normalize import Normalizer
from megavla.data.prompt import model_state_mode
from megavla.data_shards.format import Episode, Subtask, encode_jpeg
from megavla.data_shards.miniworld import MiniWorld

log = logging.getLogger(__name__)

DS_MODEL_FILE = "mp_rank_00_model_states.pt"
EMA_FILE = "ema.safetensors"
EXPORT_RECORD = "export.json"   # megavla export: step, source checkpoint, which weights
WEIGHT_CHOICES = ("auto", "ema", "raw")


class CheckpointError(ValueError):
    """A path is not a loadable run / checkpoint / export; the message says what is missing."""


@dataclass
class LoadedCheckpoint:
    model: Any  # megavla.model.vla.VLA (eval mode)
    cfg: Config
    normalizer: Normalizer | None
    text_tokenizer: Any
    fast_tokenizer: Any
    path: Path
    step: int | None
    weights: str = "raw"  # which weights were loaded: "ema" or "raw"


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """An export dir (or a bare weights dir) passes through; anything else is resolved by the rule
    every reader shares (megavla.train.resume.checkpoint_for): a run dir means its newest loadable
    checkpoint by step, not the one ``latest`` names; a damaged checkpoint is skipped (named in a
    warning) or, when asked for by path, refused."""
    from megavla.train.resume import NoLoadableCheckpoint, checkpoint_for, is_checkpoint_dir
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; give a run dir, a checkpoint dir or an export dir")
    if not is_checkpoint_dir(path) and ((path / DS_MODEL_FILE).is_file() or (path / "model.safetensors").is_file()):
        return path
    try:
        ckpt, skipped = checkpoint_for(path)
    except NoLoadableCheckpoint as e:
        hint = "" if is_checkpoint_dir(path) else (" (nor is it an export dir, which holds model.safetensors): "
                                                   "train the run first, or pass an export")
        raise CheckpointError(f"{e}{hint}") from None
    for problem in skipped:
        log.warning("damaged checkpoint skipped: %s", problem)
    return ckpt


def _load_config(ckpt: Path) -> Config:
    state = ckpt / "trainer_state.json"
    if state.is_file():
        saved = json.loads(state.read_text()).get("config")
        if saved:
            return build(Config, saved)
    for candidate in (ckpt / "config.yaml", ckpt.parent.parent / "config.yaml"):
        if candidate.is_file():
            return load_config(candidate)
    raise CheckpointError(f"{ckpt}: no trainer_state.json with a config and no config.yaml; the data "
                          "settings (cameras, chunk length, image size) are needed for inference")


def choose_weights(ckpt: Path, weights: str = "auto") -> str:
    """"ema" or "raw" for ``weights`` in WEIGHT_CHOICES: auto = EMA when the checkpoint has it."""
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights={weights!r}: choose one of {WEIGHT_CHOICES}")
    has_ema = (ckpt / EMA_FILE).is_file()
    if weights == "ema" and not has_ema:
        raise CheckpointError(f"{ckpt}: no {EMA_FILE}; train with train.ema_decay set, or load weights='raw'")
    return "ema" if weights == "ema" or (weights == "auto" and has_ema) else "raw"


def load_state_dict(ckpt: Path, weights: str = "auto") -> dict[str, torch.Tensor]:
    """Model weights of a checkpoint as fp32 tensors (DeepSpeed module states or safetensors), with
    the EMA of the trainable parameters laid over them when ``choose_weights`` picks it."""
    state = _load_raw_state_dict(ckpt)
    if choose_weights(ckpt, weights) == "ema":
        from safetensors.torch import load_file
        ema = load_file(str(ckpt / EMA_FILE))
        unknown = sorted(set(ema) - set(state))
        if unknown:
            raise CheckpointError(f"{ckpt / EMA_FILE}: {len(unknown)} tensors the model states lack "
                                  f"({unknown[:4]}); the file belongs to another model")
        state.update({k: v.float() for k, v in ema.items()})
    return state


def _load_raw_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    if (ckpt / "model.safetensors").is_file():
        from safetensors.torch import load_file
        state = load_file(str(ckpt / "model.safetensors"))
    else:
        from megavla.train.safe_load import UnsafeCheckpointError, load_pt
        try:
            saved = load_pt(ckpt / DS_MODEL_FILE)
        except UnsafeCheckpointError as e:   # a ValueError: the CLIs print it as one line
            raise CheckpointError(str(e)) from None
        if "module" not in saved:
            raise CheckpointError(f"{ckpt / DS_MODEL_FILE}: no 'module' entry (keys {sorted(saved)[:6]})")
        state = saved["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_checkpoint(path: str | Path, extra_norm_stats: dict | None = None,
                    weights: str = "auto") -> LoadedCheckpoint:
    """Model (eval mode, fp32, CPU) + config + normalizer + tokenizers of one checkpoint.
    ``extra_norm_stats``: stats of embodiments the checkpoint lacks (e.g. human for a robot-only run).
    ``weights``: "auto" (the EMA weights when the run kept them), "ema" or "raw"."""
    from megavla.model.vla import build_model
    ckpt = resolve_checkpoint_dir(path)
    cfg = _load_config(ckpt)
    model = build_model(cfg.model)
    which = choose_weights(ckpt, weights)
    state = load_state_dict(ckpt, which)
    # a LoRA run's checkpoint holds adapters (an export of it does not): build, load, then merge them
    adapters = cfg.train.lora.enabled and any(k.endswith((".lora_A", ".lora_B")) for k in state)
    if adapters:
        from megavla.model.lora import apply_lora
        apply_lora(model, cfg.train.lora)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not match the config's model: missing {missing[:4]} "
                              f"({len(missing)}), unexpected {unexpected[:4]} ({len(unexpected)}); a "
                              "ZeRO-3 or multi-rank checkpoint holds shards: `megavla export` it first")
    if adapters:
        from megavla.model.lora import merge_lora
        merge_lora(model)
    model.eval()
    stats_file = next((p for p in (ckpt / "norm_stats.json", ckpt.parent.parent / "norm_stats.json")
                       if p.is_file()), None)
    stats = json.loads(stats_file.read_text()) if stats_file else {}
    for emb, entry in (extra_norm_stats or {}).items():
        stats.setdefault(emb, entry)
    normalizer = None
    if cfg.data.normalization != "none":
        if not stats:
            raise CheckpointError(f"{ckpt}: no norm_stats.json; actions cannot be unnormalized")
        normalizer = Normalizer(stats, cfg.data.normalization, cfg.data.normalization_floor)
    text_tok = fast_tok = None
    tok_dir = ckpt / "tokenizers"
    if tok_dir.is_dir():
        from megavla.tokenizers.pair import load_tokenizers
        text_tok, fast_tok = load_tokenizers(tok_dir)
    else:
        log.warning("%s: no tokenizers/ directory; the policy runs without instruction tokens", ckpt)
    step = None
    for record in (ckpt / "trainer_state.json", ckpt / EXPORT_RECORD):  # a checkpoint's, an export's
        if record.is_file():
            step = json.loads(record.read_text()).get("step")
            break
    log.info("%s: %s weights (step %s)", ckpt, which, step)
    return LoadedCheckpoint(model, cfg, normalizer, text_tok, fast_tok, ckpt, step, which)


def frames_episode(embodiment: str, instruction: str, state: np.ndarray, images: dict[str, np.ndarray],
                   action_dim: int, scene: int = 0, task: int = 0) -> Episode:
    """One observation (HWC uint8 frames per camera, raw state [S], instruction) as a one-step
    Episode (actions unknown: zeros). The closed-loop evaluator and the policy server both build
    their batches through here, so the two see identical inputs."""
    frames = {cam: [encode_jpeg(image)] for cam, image in images.items()}
    return Episode(embodiment=embodiment, scene=scene, task=task, episode=0, instruction=instruction,
                   subtasks=[Subtask("", 0, 1)], fps=10.0, state=np.asarray(state, np.float32)[None],
                   actions=np.zeros((1, action_dim), np.float32), action_mask=np.ones(action_dim, bool),
                   step_valid=np.ones(1, bool), frames=frames)


def observation_episode(world: MiniWorld, cameras: list[str]) -> Episode:
    """The world's current observation as a one-step Episode."""
    images = {cam: world.render(cam) for cam in cameras if cam in world.cameras}
    return frames_episode(world.embodiment, world.instruction, world.ee_state(), images, world.action_dim,
                          world.scene, world.task)


def episode_sample(loaded: LoadedCheckpoint, ep: Episode, t: int, with_fast: bool = False) -> dict:
    """One (episode, timestep) as the training pipeline's sample (same cameras, sizes, normalization,
    tokens: with model.state_mode=text the prompt holds the state, data.prompt.prompt_tokens)."""
    d = loaded.cfg.data
    return build_sample(ep, t, source="eval", where=f"eval:{ep.key}", cameras=list(d.cameras),
                        image_size=d.image_size, chunk_length=d.chunk_length,
                        max_state_dim=d.max_state_dim, max_action_dim=d.max_action_dim,
                        normalizer=loaded.normalizer, text_tokenizer=loaded.text_tokenizer,
                        fast_tokenizer=loaded.fast_tokenizer if with_fast else None,
                        state_mode=model_state_mode(loaded.cfg.model))


def collate(loaded: LoadedCheckpoint, samples: list[dict]) -> Batch:
    pad = loaded.text_tokenizer.pad_id if loaded.text_tokenizer is not None else 0
    return collate_samples(samples, text_pad_id=int(pad))


def episode_batch(loaded: LoadedCheckpoint, episodes_and_steps: list[tuple[Episode, int]],
                  with_fast: bool = False) -> Batch:
    """Batch of (episode, timestep) pairs built exactly as the training pipeline builds it."""
    return collate(loaded, [episode_sample(loaded, ep, t, with_fast) for ep, t in episodes_and_steps])


class VLAPolicy:
    """``reset(world)`` / ``act(world)`` over a loaded checkpoint, with action chunking."""

    def __init__(self, loaded: LoadedCheckpoint, execute_k: int = 5, num_steps: int = 10, seed: int = 0,
                 noise_scale: float = 1.0):
        H = loaded.cfg.data.chunk_length
        if not 1 <= execute_k <= H:
            raise ValueError(f"execute_k={execute_k} must be in [1, chunk_length={H}]")
        if noise_scale < 0:
            raise ValueError(f"noise_scale={noise_scale} must be >= 0")
        # noise_scale < 1 starts the flow integration nearer the noise distribution's centre (0 = the
        # deterministic flow from x = 0); 1 samples the learned distribution as trained (openpi).
        self.loaded, self.execute_k, self.num_steps, self.noise_scale = loaded, execute_k, num_steps, noise_scale
        self.generator = torch.Generator().manual_seed(seed)
        self.queue: list[np.ndarray] = []
        self.queries = 0

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs) -> "VLAPolicy":
        return cls(load_checkpoint(path), **kwargs)

    def reset(self, world: MiniWorld) -> None:
        self.queue = []

    def plan(self, world: MiniWorld) -> np.ndarray:
        """Unnormalized action chunk [H, world.action_dim] for the current observation."""
        ld = self.loaded
        batch = episode_batch(ld, [(observation_episode(world, list(ld.cfg.data.cameras)), 0)])
        H, A = ld.cfg.data.chunk_length, ld.cfg.data.max_action_dim
        noise = torch.randn((1, H, A), generator=self.generator) * self.noise_scale
        chunk = ld.model.sample_actions(batch, num_steps=self.num_steps, noise=noise)[0].float()
        if ld.normalizer is not None:
            chunk = ld.normalizer.unnormalize(chunk, world.embodiment, "actions")
        self.queries += 1
        return chunk[:, :world.action_dim].numpy()

    def act(self, world: MiniWorld) -> np.ndarray:
        if not self.queue:
            self.queue = list(self.plan(world)[: self.execute_k])
        return self.queue.pop(0)
