"""The observation schema: which keys of a client's observation feed which model input.

A client sends one msgpack map per request (openpi's convention). Nested maps are flattened with
``/`` (as openpi's own repack transforms do), so ``{"observation": {"state": x}}`` and
``{"observation/state": x}`` both reach the key ``observation/state``. Default schema for a model
trained with cameras head, left_wrist, right_wrist (``megavla serve --print-schema`` prints the
resolved one; ``--schema FILE.yaml`` or ``EXPORT/observation_schema.yaml`` changes it)::

    embodiment: robot/arm               # whose norm stats and embodiment id the policy uses
    images:                             # model camera -> key; uint8 [H, W, 3] (HWC, RGB)
      head: observation/images/head
      left_wrist: observation/images/left_wrist
      right_wrist: observation/images/right_wrist
    optional_cameras: []                # cameras a client may leave out (the model sees them absent)
    state: observation/state            # float [S]: the embodiment's raw (unnormalized) state
    prompt: prompt                      # str: the instruction
    default_prompt: null                # used when the prompt key is missing (null: it is required)
    ignore_keys: []                     # other keys the client sends that the server should ignore
    action_names: []                    # dim names in the metadata (default: the embodiment's)
    state_names: []
    max_image_side: 2048                # larger frames are refused
    max_prompt_chars: 1000              # longer prompts are refused

Any other key is an error (nothing is dropped silently). Frames of any size up to
``max_image_side`` are JPEG-encoded and decoded to the model's image size exactly as training frames
were (``data.collate.decode_frame``), so the policy sees what it saw in training.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megavla.config.core import ConfigError, build, read_yaml
from megavla.data_shards.embodiments import EMBODIMENT_IDS

# What the dims mean (docs/data_format.md, "Action and state convention"): per arm, a relative
# end-effector motion in the ego frame and an absolute gripper command.
_ARM_ACTIONS = ["dx", "dy", "dz", "rx", "ry", "rz", "gripper"]
# State: position, the first two columns of the rotation matrix (6D), gripper (episode format v2).
_ARM_STATE = ["x", "y", "z", "r00", "r10", "r20", "r01", "r11", "r21", "gripper"]
DEFAULT_NAMES = {
    "robot/arm": (_ARM_ACTIONS, _ARM_STATE),
    "robot/bimanual": ([f"right_{n}" for n in _ARM_ACTIONS] + [f"left_{n}" for n in _ARM_ACTIONS],
                       [f"right_{n}" for n in _ARM_STATE] + [f"left_{n}" for n in _ARM_STATE]),
    "human/ego": ([f"right_{n}" for n in _ARM_ACTIONS] + [f"left_{n}" for n in _ARM_ACTIONS],
                  [f"right_{n}" for n in _ARM_STATE] + [f"left_{n}" for n in _ARM_STATE]),
}
ACTION_SPACE = ("per arm [dx, dy, dz] translation + [rx, ry, rz] axis-angle rotation of the end effector "
                "in the ego frame (head camera at the episode start), then the absolute gripper command "
                "in [0, 1] (1 = closed); see docs/data_format.md")


class ObservationError(ValueError):
    """A request's observation does not match the schema; the message names the key and the fix."""


@dataclass
class ObservationSchema:
    embodiment: str = "robot/arm"
    images: dict[str, str] = field(default_factory=dict)  # empty: observation/images/<camera>
    optional_cameras: list[str] = field(default_factory=list)
    state: str = "observation/state"
    prompt: str = "prompt"
    default_prompt: str | None = None
    ignore_keys: list[str] = field(default_factory=list)
    # Dim names in the metadata; empty: the embodiment's defaults above (when the dims agree).
    action_names: list[str] = field(default_factory=list)
    state_names: list[str] = field(default_factory=list)
    max_image_side: int = 2048
    # Prompt tokens all enter attention: a cap keeps one request from costing O(length^2).
    max_prompt_chars: int = 1000

    def validate(self) -> None:
        if self.embodiment not in EMBODIMENT_IDS:
            raise ConfigError(f"embodiment={self.embodiment!r}: known embodiments {sorted(EMBODIMENT_IDS)}")
        if self.max_prompt_chars < 1:
            raise ConfigError(f"max_prompt_chars={self.max_prompt_chars} must be >= 1")
        if not 1 <= self.max_image_side <= 8192:
            raise ConfigError(f"max_image_side={self.max_image_side} must be in [1, 8192]")
        keys = [*self.images.values(), self.state, self.prompt]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"two model inputs read the same observation key: {keys}")


@dataclass
class Observation:
    images: dict[str, np.ndarray]  # camera -> uint8 [H, W, 3]
    state: np.ndarray              # float32 [S]
    prompt: str


def load_schema(path: str | Path | None, export_dir: Path | None = None) -> ObservationSchema:
    """``path`` (YAML), else ``export_dir/observation_schema.yaml`` if present, else the defaults."""
    if path is None and export_dir is not None and (export_dir / "observation_schema.yaml").is_file():
        path = export_dir / "observation_schema.yaml"
    if path is None:
        return build(ObservationSchema, {})
    try:
        return build(ObservationSchema, read_yaml(path) or {}, "schema")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def flatten(obs: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(obs, dict):
        raise ObservationError(f"the request must be a map of observation keys, got {type(obs).__name__}")
    flat: dict[str, Any] = {}
    for key, value in obs.items():
        if not isinstance(key, str):
            raise ObservationError(f"observation keys must be strings, got {key!r}")
        name = f"{prefix}{key}"
        items = flatten(value, name + "/").items() if isinstance(value, dict) else [(name, value)]
        for k, v in items:
            if k in flat:
                raise ObservationError(f"key {k!r} is given twice (once nested, once flat)")
            flat[k] = v
    return flat


class ResolvedSchema:
    """The schema bound to one model: cameras it was trained with and the embodiment's dims."""

    def __init__(self, schema: ObservationSchema, cameras: list[str], state_dim: int, action_dim: int):
        unknown = sorted(set(schema.images) - set(cameras))
        if unknown:
            raise ConfigError(f"schema.images names cameras {unknown} the model was not trained with "
                              f"(data.cameras = {cameras})")
        self.schema, self.state_dim, self.action_dim = schema, state_dim, action_dim
        self.cameras = {cam: schema.images.get(cam, f"observation/images/{cam}") for cam in cameras}
        optional = set(schema.optional_cameras)
        if optional - set(cameras):
            raise ConfigError(f"schema.optional_cameras {sorted(optional - set(cameras))} are not model "
                              f"cameras ({cameras})")
        self.required = [c for c in cameras if c not in optional]
        default_actions, default_state = DEFAULT_NAMES.get(schema.embodiment, ([], []))
        self.action_names = _names(schema.action_names, default_actions, action_dim, "action")
        self.state_names = _names(schema.state_names, default_state, state_dim, "state")
        self.state_low: np.ndarray | None = None   # raw-unit bounds per state dim (bound_state)
        self.state_high: np.ndarray | None = None
        self.max_abs_normalized: float | None = None

    def bound_state(self, normalizer, max_abs_normalized: float) -> None:
        """Refuse states whose normalized value is beyond ``max_abs_normalized`` (data.max_abs_normalized:
        training skipped every episode beyond it, and a value like 1e38 normalizes to inf and would
        poison the batch it joins). The bounds are kept in raw units, so a request costs one compare."""
        limit = np.full(self.state_dim, float(max_abs_normalized))
        if normalizer is None:  # normalization "none": the raw values are what the model sees
            low, high = -limit, limit
        else:
            emb = self.schema.embodiment
            low = np.asarray(normalizer.unnormalize(-limit, emb, "state"), np.float64)
            high = np.asarray(normalizer.unnormalize(limit, emb, "state"), np.float64)
        self.state_low, self.state_high = np.minimum(low, high), np.maximum(low, high)
        self.max_abs_normalized = float(max_abs_normalized)

    def describe(self) -> dict:
        s = self.schema
        return {"images": dict(self.cameras), "required_cameras": self.required,
                "optional_cameras": [c for c in self.cameras if c not in self.required],
                "image_layout": "HWC uint8 RGB", "max_image_side": s.max_image_side,
                "state": s.state, "state_dim": self.state_dim, "state_names": self.state_names,
                "prompt": s.prompt, "default_prompt": s.default_prompt, "max_prompt_chars": s.max_prompt_chars,
                "ignore_keys": list(s.ignore_keys)}

    def parse(self, obs: Any) -> Observation:
        flat = flatten(obs)
        s = self.schema
        known = {*self.cameras.values(), s.state, s.prompt, *s.ignore_keys}
        extra = sorted(k for k in flat if k not in known)
        sent = [cam for cam, key in self.cameras.items() if key in flat]
        missing = [cam for cam in self.required if cam not in sent]
        extra_images = [k for k in extra if isinstance(flat[k], np.ndarray) and flat[k].ndim == 3]
        if missing or extra_images:
            raise ObservationError(
                f"wrong camera count: expected the {len(self.required)} camera key(s) "
                f"{[self.cameras[c] for c in self.required]}, got {len(sent) + len(extra_images)} images; "
                f"missing {[self.cameras[c] for c in missing]}, not in the schema {extra_images}")
        if extra:
            raise ObservationError(f"unexpected key(s) {extra}; the schema reads {sorted(known)} "
                                   "(list keys to ignore under the schema's ignore_keys)")
        images = {cam: self._image(self.cameras[cam], flat[self.cameras[cam]]) for cam in sent}
        return Observation(images, self._state(flat), self._prompt(flat))

    def _image(self, key: str, value: Any) -> np.ndarray:
        if not isinstance(value, np.ndarray):
            raise ObservationError(f"{key}: expected a uint8 [H, W, 3] array, got {type(value).__name__}")
        if value.dtype != np.uint8:
            raise ObservationError(f"{key}: dtype {value.dtype}, expected uint8 (0-255 RGB; convert "
                                   "float images with (x * 255).astype(np.uint8))")
        if value.ndim != 3 or value.shape[2] != 3:
            hint = " (looks like CHW: send HWC, e.g. image.transpose(1, 2, 0))" if value.ndim == 3 and value.shape[0] == 3 else ""
            raise ObservationError(f"{key}: shape {list(value.shape)}, expected [H, W, 3]{hint}")
        side = self.schema.max_image_side
        if not (0 < value.shape[0] <= side and 0 < value.shape[1] <= side):
            raise ObservationError(f"{key}: {value.shape[0]} x {value.shape[1]} image; each side must be "
                                   f"in [1, {side}] (schema max_image_side)")
        return value

    def _state(self, flat: dict) -> np.ndarray:
        key = self.schema.state
        if key not in flat:
            raise ObservationError(f"missing key {key!r}: float [{self.state_dim}] state "
                                   f"({', '.join(self.state_names)})")
        value = flat[key]
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
            raise ObservationError(f"{key}: expected a float array [{self.state_dim}], got {kind}")
        if value.shape != (self.state_dim,):
            raise ObservationError(f"{key}: shape {list(value.shape)}, expected [{self.state_dim}] "
                                   f"({', '.join(self.state_names)})")
        if not np.isfinite(value).all():
            raise ObservationError(f"{key}: {self._dims(np.flatnonzero(~np.isfinite(value)), value)} "
                                   "NaN or inf; send finite floats")
        if self.state_low is not None:
            wide = value.astype(np.float64)
            out = np.flatnonzero((wide < self.state_low) | (wide > self.state_high))
            if out.size:
                ranges = ", ".join(f"[{self.state_low[i]:.4g}, {self.state_high[i]:.4g}]" for i in out[:3])
                raise ObservationError(
                    f"{key}: {self._dims(out, value)} outside the range the model takes ({ranges}: "
                    f"beyond +-{self.max_abs_normalized:g} once normalized, data.max_abs_normalized, which "
                    "training never saw); send the raw state in the units of the export's norm_stats.json")
        state = value.astype(np.float32)
        if not np.isfinite(state).all():  # a float64 beyond float32's range (no bounds set)
            raise ObservationError(f"{key}: {self._dims(np.flatnonzero(~np.isfinite(state)), value)} "
                                   "overflow float32; send values within +-3.4e38")
        return state

    def _dims(self, idx: np.ndarray, value: np.ndarray) -> str:
        """'dim 3 (r00) = 1e+38, ...' for the first few offending dims."""
        shown = ", ".join(f"dim {i} ({self.state_names[i]}) = {value[i]:.4g}" for i in idx[:3])
        return shown + (f" and {idx.size - 3} more" if idx.size > 3 else "") + (" is" if idx.size == 1 else " are")

    def _prompt(self, flat: dict) -> str:
        key = self.schema.prompt
        if key not in flat:
            if self.schema.default_prompt is None:
                raise ObservationError(f"missing key {key!r}: the instruction text (or set the schema's "
                                       "default_prompt)")
            return self.schema.default_prompt
        value = flat[key]
        if isinstance(value, np.ndarray) and value.dtype.kind == "U" and value.ndim == 0:
            value = str(value)
        if not isinstance(value, str):
            raise ObservationError(f"{key}: expected a string, got {type(value).__name__}")
        if len(value) > self.schema.max_prompt_chars:
            raise ObservationError(f"{key}: {len(value)} characters, over the schema's max_prompt_chars="
                                   f"{self.schema.max_prompt_chars}")
        return str(value)


def _names(given: list[str], default: list[str], dim: int, kind: str) -> list[str]:
    if given:
        if len(given) != dim:
            raise ConfigError(f"schema.{kind}_names has {len(given)} names for {dim} {kind} dims")
        return list(given)
    return list(default) if len(default) == dim else [f"{kind}_{i}" for i in range(dim)]
