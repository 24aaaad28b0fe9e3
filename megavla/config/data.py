"""Data settings: which shard sets, how they are mixed, chunked, normalized and batched."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .core import ConfigError


@dataclass
class DataConfig:
    # Named shard sets (name -> directory written by `megavla data synth` or a converter).
    sources: dict[str, str] = field(default_factory=dict)
    # Sampling weight per source name. Sources not named share what the named weights leave of 1,
    # so with sources robot + human, `data.mixture.human=0.25` is 75/25 and an empty mixture is
    # equal shares. Weights are normalized: {robot: 1, human: 1} is the paper's 50/50 mix too.
    mixture: dict[str, float] = field(default_factory=dict)
    # Held-out shard sets for validation loss (name -> directory).
    val_sources: dict[str, str] = field(default_factory=dict)
    # Keep this fraction of scene x task combos (nested: the 0.25 set is inside the 0.5 set).
    diversity_fraction: float = 1.0
    diversity_seed: int = 0
    # Restrict to / exclude explicit combos ("scene:task" strings); empty = no restriction.
    include_combos: list[str] = field(default_factory=list)
    exclude_combos: list[str] = field(default_factory=list)
    # Action chunk length H, max action / state dims (padded with masks).
    chunk_length: int = 10
    max_action_dim: int = 32
    max_state_dim: int = 32
    cameras: list[str] = field(default_factory=lambda: ["head", "left_wrist", "right_wrist"])
    # Frames are resized to it. Left out of a run config (megavla.config.load_config): the model's
    # image size (model.image_size, else its preset's); 224 is the default of a DataConfig built alone.
    image_size: int = 224
    # Training batches get openpi's image augmentation on the device (megavla/data/augment.py:
    # 95 % crop + resize and +-5 deg rotation on non-wrist cameras, colour jitter on all);
    # validation and evaluation never do.
    augment_images: bool = True
    batch_size: int = 8
    num_workers: int = 2
    shuffle_buffer: int = 64
    # Timesteps drawn from one decoded episode before moving on (amortizes tar reading).
    samples_per_episode: int = 4
    seed: int = 0
    on_bad_sample: Literal["skip", "fail"] = "skip"
    normalization: Literal["quantile", "zscore", "none"] = "quantile"
    # Smallest q99-q01 range (quantile) or std (zscore) used as a divisor: degenerate dims (e.g. a
    # constant gripper) use it, with a warning, instead of dividing by ~0.
    normalization_floor: float = 1e-3
    # Largest |value| of normalized state/actions (quantile: [q01, q99] -> [-1, 1]) an episode may
    # put in a batch; an episode beyond it (a corrupt value, or stats that do not fit the data) is
    # skipped and counted as bad_sample. Checked per episode by data_shards/validate.py.
    max_abs_normalized: float = 100.0
    # Human samples' gripper dims: "masked" (the paper: hand data never supervises the gripper) or
    # "closure" (the hand's closure estimate, hands.grip_closure, is the gripper target; its dims are
    # normalized from the gripper convention's [0, 1] range, as the robot's).
    human_gripper: Literal["masked", "closure"] = "masked"

    def validate(self) -> None:
        if not 0.0 <= self.diversity_fraction <= 1.0:
            raise ConfigError(f"diversity_fraction={self.diversity_fraction} must be in [0, 1]")
        for name, value in [("chunk_length", self.chunk_length), ("batch_size", self.batch_size),
                            ("max_action_dim", self.max_action_dim), ("image_size", self.image_size),
                            ("samples_per_episode", self.samples_per_episode)]:
            if value <= 0:
                raise ConfigError(f"{name}={value} must be positive")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"shuffle_buffer={self.shuffle_buffer} must be >= 0 "
                              "(0: each shuffle window holds one episode's samples)")
        if self.normalization_floor <= 0:
            raise ConfigError(f"normalization_floor={self.normalization_floor} must be positive")
        if not self.max_abs_normalized > 0:
            raise ConfigError(f"max_abs_normalized={self.max_abs_normalized} must be positive")
        if not self.cameras:
            raise ConfigError("cameras is empty; list at least one of head, left_wrist, right_wrist")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers={self.num_workers} must be >= 0")
        for name, weight in self.mixture.items():
            if name not in self.sources:
                raise ConfigError(f"mixture.{name}: no source named {name!r}; sources are {sorted(self.sources)}")
            if weight < 0:
                raise ConfigError(f"mixture.{name}={weight} must be >= 0")
        self.resolved_mixture()  # raises if unnamed sources would be left with nothing
        bad = [c for c in self.cameras if c not in ("head", "left_wrist", "right_wrist")]
        if bad:
            raise ConfigError(f"cameras: unknown camera {bad[0]!r}; choose from head, left_wrist, right_wrist")

    def resolved_mixture(self) -> dict[str, float]:
        """Normalized sampling weight of every source (see the ``mixture`` comment)."""
        if not self.sources:
            return {}
        unnamed = [name for name in self.sources if name not in self.mixture]
        named_total = sum(self.mixture.values())
        if unnamed and named_total >= 1.0:
            raise ConfigError(
                f"mixture gives {dict(self.mixture)} (sum {named_total:g} >= 1) and leaves "
                f"{unnamed} nothing; give them a weight too (e.g. data.mixture.{unnamed[0]}=0.5)")
        share = (1.0 - named_total) / len(unnamed) if unnamed else 0.0
        weights = {name: float(self.mixture.get(name, share)) for name in self.sources}
        total = sum(weights.values())
        if total <= 0:
            raise ConfigError(f"mixture weights {weights} are all zero; give one source a positive weight")
        return {name: w / total for name, w in weights.items()}
