"""One (episode, timestep) -> one training sample (numpy), and a list of samples -> megavla.batch.Batch.

Per sample (see megavla/batch.py for the fields):

* images: only frame ``t`` of each camera in ``data.cameras`` order is read and decoded (simplejpeg),
  straight into the batch buffer, resized to ``image_size`` if the stored size differs (letterboxed,
  not stretched, when not square: resize_with_pad); an absent
  camera gives zeros and ``image_mask`` False. The buffer is [B, C, R, R, 3] (what the decoder writes,
  so no copy at all); ``Batch.images`` is its [B, C, 3, R, R] permuted view, as the contract says.
* state: ``state[t]`` normalized, zero-padded to ``max_state_dim`` (``state_mask`` marks native dims).
* actions: the chunk ``a[t : t+H]`` normalized, zero-padded to ``max_action_dim``. ``action_time_mask``
  is False past the episode end and where ``step_valid`` is False; those steps hold zeros.
  ``action_dim_mask`` is the episode's ``action_mask`` (gripper dims off for human data), padded False.
* fast_tokens: FAST tokens of the normalized chunk restricted to the supervised dims, ``[H, d]``; masked
  steps are forward-filled from the last valid step (a smooth signal for the DCT; they carry no
  new information), so every chunk has exactly H steps.
* text_tokens: instruction, ``encode(text, add_bos=True, add_eos=False)``; with ``state_mode="text"``
  (π0.5) the prompt with the state of step t in it (prompt.prompt_tokens: one function for training
  and inference).
* subtask_tokens: the subtask whose ``[start, end)`` holds ``t`` (else the last one started before ``t``;
  none -> empty), ``encode(text, add_bos=False, add_eos=True)``: the high-level head's target ends in EOS.

Token sequences are right-padded to the longest in the batch (at least 1) with the text tokenizer's
``pad_id`` (0 for FAST), masks mark valid tokens.
"""
from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import simplejpeg
import torch

from megavla.batch import Batch
from megavla.data_shards import hands
from megavla.data_shards.embodiments import EMBODIMENT_IDS
from megavla.data_shards.format import Episode, EpisodeFormatError, resize_with_pad

from .normalize import Normalizer
from .prompt import SampleError, check_state_mode, prompt_tokens
from .prompt import cached_text as _cached_text
from .prompt import encode_or_skip as _encode


class ImageDecodeError(EpisodeFormatError):
    """A stored JPEG frame cannot be decoded."""


class NonFiniteBatchError(RuntimeError):
    """A batch would hold NaN/inf state or actions (never skipped: it means a check upstream is missing)."""


def decode_frame(jpeg, size: int, where: str, out: np.ndarray | None = None) -> np.ndarray:
    """JPEG bytes (or a tar_reader.MemberRef, read now) -> uint8 [size, size, 3] (HWC), decoded
    straight into ``out`` (a slot of the batch buffer) when given and the stored size fits."""
    try:
        # a tar_reader.MemberRef: its bytes in the shard's map, not copied out (~2 us a frame)
        data = jpeg.view() if hasattr(jpeg, "view") else jpeg.read() if hasattr(jpeg, "read") else jpeg
        rgb = None
        if out is not None and out.shape == (size, size, 3) and out.flags.c_contiguous:
            # No header parse first (~4 us a frame): a frame of the batch's size fills `out` exactly; a
            # smaller one fills the start of `out` (copied out, then resized below); a larger one does
            # not fit (ValueError before decoding) and is decoded with downscaling below.
            try:
                rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
            except ValueError:
                rgb = None
            else:
                if rgb.shape == out.shape:
                    return out
                rgb = rgb.copy()
        if rgb is None:
            # min_height/min_width let libjpeg-turbo downscale in the DCT domain when frames are larger.
            rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=size, min_width=size)
    except (ValueError, RuntimeError, TypeError, OSError) as e:
        raise ImageDecodeError(f"{where}: JPEG frame cannot be decoded ({e})") from None
    if rgb.shape[0] != size or rgb.shape[1] != size:
        rgb = resize_with_pad(rgb, size)
    if out is None:
        return rgb
    out[...] = rgb
    return out


def active_subtask(ep: Episode, t: int) -> str:
    started = [s for s in ep.subtasks if s.start <= t]
    for s in started:
        if t < s.end:
            return s.text
    return max(started, key=lambda s: s.start).text if started else ""


def human_gripper_supervision(ep: Episode) -> tuple[np.ndarray, np.ndarray]:
    """``data.human_gripper: closure``: (actions, action_mask) of a human episode with its gripper dims
    supervised by the hand's closure estimate (hands.grip_closure of the tracked keypoints; action t
    holds the closure at t+1, the last step holds, as hands_to_actions builds them). Without stored
    keypoints, the stored gripper values are used: importers write exactly that estimate there."""
    dims = list(hands.GRIPPER_DIMS)
    if ep.actions.shape[1] != hands.HUMAN_ACTION_DIM:
        raise EpisodeFormatError(f"{ep.key}: data.human_gripper=closure needs the two-hand human action layout "
                                 f"({hands.HUMAN_ACTION_DIM} dims), got {ep.actions.shape[1]}")
    actions, mask = ep.actions.copy(), ep.action_mask.copy()
    if ep.hand_keypoints is not None:
        closure = hands.grip_closure(ep.hand_keypoints)  # [T, 2]
        actions[:, dims] = np.concatenate([closure[1:], closure[-1:]]).astype(actions.dtype)
    mask[dims] = True
    return actions, mask


def episode_arrays(ep: Episode, cache: dict, normalizer: Normalizer | None, chunk_length: int,
                    max_state_dim: int, max_action_dim: int, human_gripper: str = "masked") -> dict:
    """What every sample of the episode reads, made once per episode: normalized, zero-padded state
    and actions (actions with ``chunk_length`` zero rows past the end, so a chunk is one slice), the
    step mask padded with False, the dim masks, and the FAST source (supervised dims only).
    ``human_gripper="closure"``: human episodes' gripper dims are supervised (human_gripper_supervision)."""
    if "state_pad" in cache:
        return cache
    T, H, S, A = ep.num_steps, chunk_length, ep.state.shape[1], ep.actions.shape[1]
    raw_actions, action_mask = ep.actions, ep.action_mask
    if human_gripper == "closure" and ep.embodiment.startswith("human/"):
        raw_actions, action_mask = human_gripper_supervision(ep)
    norm = normalizer is not None
    state = normalizer.normalize(ep.state, ep.embodiment, "state") if norm else ep.state
    actions = normalizer.normalize(raw_actions, ep.embodiment, "actions") if norm else raw_actions
    cache["state_pad"] = np.zeros((T, max_state_dim), np.float32)
    cache["state_pad"][:, :S] = state
    cache["actions_pad"] = np.zeros((T + H, max_action_dim), np.float32)
    cache["actions_pad"][:T, :A] = actions
    cache["valid_pad"] = np.zeros(T + H, bool)
    cache["valid_pad"][:T] = ep.step_valid
    cache["state_mask"] = np.zeros(max_state_dim, bool)
    cache["state_mask"][:S] = True
    cache["dim_mask"] = np.zeros(max_action_dim, bool)
    cache["dim_mask"][:A] = action_mask
    cache["fast_source"] = actions[:, action_mask]
    return cache


def fast_chunk(ep: Episode, t: int, cache: dict, chunk_length: int) -> np.ndarray:
    """The action chunk FAST encodes, [H, supervised dims] (``cache``: episode_arrays): masked steps
    forward-filled from the last valid one (t itself is valid: see pipeline sampling; were it not,
    step t stands in for the masked steps before the first valid one)."""
    time_mask = cache["valid_pad"][t : t + chunk_length]
    if t + chunk_length <= ep.num_steps and time_mask.all():   # nothing to fill: the rows as stored
        return cache["fast_source"][t : t + chunk_length]
    last = np.maximum.accumulate(np.where(time_mask, np.arange(t, t + chunk_length), t))
    np.minimum(last, ep.num_steps - 1, out=last)
    return cache["fast_source"][last]


def encode_fast_chunks(tok, chunks: list[np.ndarray], wheres: list[str]) -> list[list[int] | SampleError]:
    """FAST ids of each chunk (a batch at a time: FastTokenizer.encode_many), or the SampleError of
    a chunk the tokenizer refuses (then each chunk is encoded alone to find which)."""
    if tok is None:
        return [[] for _ in chunks]
    if hasattr(tok, "encode_many"):
        try:
            return [list(ids) for ids in tok.encode_many(chunks)]
        except Exception:  # noqa: BLE001 - one chunk was refused: find it below
            pass
    out: list[list[int] | SampleError] = []
    for chunk, where in zip(chunks, wheres):
        try:
            out.append(_encode(tok, chunk, f"{where}.actions.npy", "FAST"))
        except SampleError as e:
            out.append(e)
    return out


def build_sample(ep: Episode, t: int, *, source: str, where: str, cameras: list[str], image_size: int,
                 chunk_length: int, max_state_dim: int, max_action_dim: int,
                 normalizer: Normalizer | None, text_tokenizer=None, fast_tokenizer=None,
                 text_cache: dict | None = None, images_out: np.ndarray | None = None,
                 token_cache: dict | None = None, state_mode: str | None = None) -> dict[str, Any]:
    """``text_cache``: a dict kept per episode (padded normalized arrays, token ids) shared by its samples.
    ``token_cache``: a dict of token ids by text shared across episodes (instructions and subtasks repeat
    across a data set; the caller bounds its size); default: ``text_cache``.
    ``state_mode``: the model's (model_state_mode); "text" writes the state into the prompt.
    ``images_out``: uint8 [C, R, R, 3] to decode into (a slot of the batch buffer); the sample then
    carries no "images" entry and collate_samples must get the same buffer.
    The same as decode_sample_images followed by sample_fields (the loader runs them a batch at a time)."""
    images = images_out if images_out is not None else np.empty((len(cameras), image_size, image_size, 3), np.uint8)
    image_mask = decode_sample_images(ep, t, where=where, cameras=cameras, image_size=image_size, out=images)
    return {**({} if images_out is not None else {"images": images}), "image_mask": image_mask,
            **sample_fields(ep, t, source=source, where=where, chunk_length=chunk_length,
                            max_state_dim=max_state_dim, max_action_dim=max_action_dim, normalizer=normalizer,
                            text_tokenizer=text_tokenizer, fast_tokenizer=fast_tokenizer,
                            text_cache=text_cache, token_cache=token_cache, state_mode=state_mode)}


def decode_sample_images(ep: Episode, t: int, *, where: str, cameras: list[str], image_size: int,
                         out: np.ndarray) -> np.ndarray:
    """Frame t of each camera decoded into ``out`` uint8 [C, R, R, 3] (zeros for an absent camera);
    returns image_mask bool [C]. Raises ImageDecodeError."""
    image_mask = np.zeros(len(cameras), bool)
    for c, cam in enumerate(cameras):
        if cam in ep.frames:
            decode_frame(ep.frames[cam][t], image_size, f"{where}.{cam}.{t:04d}.jpg", out=out[c])
            image_mask[c] = True
        else:
            out[c] = 0
    return image_mask


def sample_fields(ep: Episode, t: int, *, source: str, where: str, chunk_length: int, max_state_dim: int,
                  max_action_dim: int, normalizer: Normalizer | None, text_tokenizer=None, fast_tokenizer=None,
                  text_cache: dict | None = None, token_cache: dict | None = None,
                  human_gripper: str = "masked", state_mode: str | None = None) -> dict[str, Any]:
    """Everything of a sample but its images (see build_sample). Raises SampleError (a tokenizer)."""
    check_state_mode(state_mode)
    H = chunk_length
    cache = episode_arrays(ep, text_cache if text_cache is not None else {}, normalizer, H,
                            max_state_dim, max_action_dim, human_gripper)
    # Steps past the end are masked and their rows are zero in actions_pad; masked steps inside the
    # episode are zeroed here.
    time_mask = cache["valid_pad"][t : t + H].copy()
    actions_out = cache["actions_pad"][t : t + H].copy()
    actions_out[~time_mask] = 0.0

    fast: list[int] = []
    if fast_tokenizer is not None:
        fast = _encode(fast_tokenizer, fast_chunk(ep, t, cache, H), f"{where}.actions.npy", "FAST")

    tokens = token_cache if token_cache is not None else cache
    instruction = prompt_tokens(text_tokenizer, tokens, ep.instruction, cache["state_pad"][t], state_mode,
                                f"{where}.meta.json instruction")
    subtask = _cached_text(text_tokenizer, tokens, "subtask", active_subtask(ep, t),
                           f"{where}.meta.json subtask", add_bos=False, add_eos=True)
    return {
        "state": cache["state_pad"][t].copy(), "state_mask": cache["state_mask"].copy(),
        "actions": actions_out, "action_dim_mask": cache["dim_mask"].copy(), "action_time_mask": time_mask,
        "text_tokens": instruction, "subtask_tokens": subtask,
        "fast_tokens": fast, "embodiment": EMBODIMENT_IDS[ep.embodiment],
        "meta": {"source": source, "key": ep.key, "scene": ep.scene, "task": ep.task, "timestep": t},
    }


def _pad_tokens(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    mask = np.arange(max(1, int(lengths.max()))) < lengths[:, None]
    tokens = np.full(mask.shape, pad_id, dtype=np.int64)
    tokens[mask] = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(tokens), torch.from_numpy(mask)


def _assert_finite(state: np.ndarray, actions: np.ndarray, keys: list[str]) -> None:
    """The last line of defence (the episode validator bounds every value first): nothing non-finite
    ever reaches a batch. numpy, not torch: ~10 us for a batch of 32 (torch.isfinite: ~130 us)."""
    if not (np.isfinite(state).all() and np.isfinite(actions).all()):
        bad = [key for key, s, a in zip(keys, state, actions) if not (np.isfinite(s).all() and np.isfinite(a).all())]
        raise NonFiniteBatchError(f"non-finite state/actions in samples {bad}; the episode validator "
                                  "should have skipped them (a bug: please report)")


def collate_samples(samples: list[dict[str, Any]], text_pad_id: int = 0, fast_pad_id: int = 0,
                    images: torch.Tensor | None = None) -> Batch:
    """``images``: the uint8 [B, C, R, R, 3] buffer the samples were decoded into (rows beyond
    len(samples) dropped). Batch.images is its [B, C, 3, R, R] view (channels-last memory)."""
    def stack(name: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([s[name] for s in samples]))

    state_np = np.stack([s["state"] for s in samples])
    actions_np = np.stack([s["actions"] for s in samples])
    _assert_finite(state_np, actions_np, [s["meta"]["key"] for s in samples])
    state, actions = torch.from_numpy(state_np), torch.from_numpy(actions_np)
    text, text_mask = _pad_tokens([s["text_tokens"] for s in samples], text_pad_id)
    subtask, subtask_mask = _pad_tokens([s["subtask_tokens"] for s in samples], text_pad_id)
    fast, fast_mask = _pad_tokens([s["fast_tokens"] for s in samples], fast_pad_id)
    meta = {k: [s["meta"][k] for s in samples] for k in samples[0]["meta"]}
    return Batch(
        images=(stack("images") if images is None else images[: len(samples)]).permute(0, 1, 4, 2, 3),
        image_mask=stack("image_mask"),
        text_tokens=text, text_mask=text_mask, state=state, state_mask=stack("state_mask"),
        actions=actions, action_dim_mask=stack("action_dim_mask"),
        action_time_mask=stack("action_time_mask"), fast_tokens=fast, fast_mask=fast_mask,
        subtask_tokens=subtask, subtask_mask=subtask_mask,
        embodiment=torch.tensor([s["embodiment"] for s in samples], dtype=torch.int64), meta=meta,
    )


class BatchFields:
    """The non-image fields of one batch, written sample by sample into arrays preallocated for the
    batch: what ``collate_samples([sample_fields(...) ...])`` gives, field for field, without a dict
    and six small copies per sample and a stack per field per batch (in a loop over the same samples:
    16.8 -> 11.4 us a sample). In a loader worker the arrays are carved from the image buffer's
    shared Arena (buffers.py), so they need no pickling. ``add`` raises SampleError (a tokenizer)
    before writing anything."""

    # Token columns per sequence field an arena holds room for (longer batches: by value).
    ARENA_TOKENS = 256

    @classmethod
    def arena_bytes(cls, batch_size: int, chunk_length: int, max_state_dim: int, max_action_dim: int,
                    num_cameras: int) -> int:
        """Room for every field of a batch in a buffers.Arena (64-byte alignment slack included)."""
        B, H, S, A = batch_size, chunk_length, max_state_dim, max_action_dim
        fixed = B * (num_cameras + 4 * S + S + 4 * H * A + A + H + 8)
        return fixed + 3 * B * cls.ARENA_TOKENS * 9 + 13 * 64

    def __init__(self, batch_size: int, chunk_length: int, max_state_dim: int, max_action_dim: int,
                 num_cameras: int, text_tokenizer=None, token_cache: dict | None = None, arena=None,
                 state_mode: str | None = None):
        check_state_mode(state_mode)
        B, H = batch_size, chunk_length
        self.H, self.text_tokenizer, self.arena, self.state_mode = H, text_tokenizer, arena, state_mode
        self.offsets: dict[str, tuple[int, str]] = {}   # field -> (byte offset, dtype) in the arena
        self.layout: dict[str, tuple[int, str, tuple[int, ...]]] = {}   # set by batch()
        self.token_cache = token_cache if token_cache is not None else {}
        self.n = 0
        # Every row add() writes is written whole, so arena arrays (reused, stale) need no zeroing.
        self.image_mask = self._array("image_mask", (B, num_cameras), bool)
        self.state = self._array("state", (B, max_state_dim), np.float32)
        self.state_mask = self._array("state_mask", (B, max_state_dim), bool)
        self.actions = self._array("actions", (B, H, max_action_dim), np.float32)
        self.action_dim_mask = self._array("action_dim_mask", (B, max_action_dim), bool)
        self.action_time_mask = self._array("action_time_mask", (B, H), bool)
        self.embodiment = self._array("embodiment", (B,), np.int64)
        self.text, self.subtask, self.fast = [], [], []
        self.meta: dict[str, list] = {"source": [], "key": [], "scene": [], "task": [], "timestep": []}

    def _carve(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray | None:
        """The field's array in the arena (its offset recorded for the layout); None without room."""
        got = self.arena.take(shape, dtype) if self.arena is not None else None
        if got is None:
            return None
        self.offsets[name] = (got[1], got[0].dtype.str)
        return got[0]

    def _array(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        out = self._carve(name, shape, dtype)
        return out if out is not None else np.zeros(shape, dtype)

    def _in_arena(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` copied into the arena when it has room, else ``tensor`` itself."""
        array = tensor.numpy()
        out = self._carve(name, array.shape, array.dtype)
        if out is None:
            return tensor
        out[...] = array
        return torch.from_numpy(out)

    def add(self, ep: Episode, t: int, cache: dict, *, source: str, where: str, image_mask: np.ndarray,
            fast_tokens: list[int]) -> None:
        """Sample (ep, t) in the next row; ``cache``: its episode_arrays (already made)."""
        tokens = self.token_cache
        instruction = prompt_tokens(self.text_tokenizer, tokens, ep.instruction, cache["state_pad"][t],
                                    self.state_mode, f"{where}.meta.json instruction")
        subtask = _cached_text(self.text_tokenizer, tokens, "subtask", active_subtask(ep, t),
                               f"{where}.meta.json subtask", add_bos=False, add_eos=True)
        i, H = self.n, self.H
        self.n += 1
        self.image_mask[i] = image_mask
        self.state[i] = cache["state_pad"][t]
        self.state_mask[i] = cache["state_mask"]
        time_mask = cache["valid_pad"][t : t + H]
        self.action_time_mask[i] = time_mask
        self.actions[i] = cache["actions_pad"][t : t + H]
        if not time_mask.all():   # masked steps inside the episode hold zeros (past the end: already)
            self.actions[i][~time_mask] = 0.0
        self.action_dim_mask[i] = cache["dim_mask"]
        self.embodiment[i] = EMBODIMENT_IDS[ep.embodiment]
        self.text.append(instruction)
        self.subtask.append(subtask)
        self.fast.append(fast_tokens)
        meta = self.meta
        meta["source"].append(source)
        meta["key"].append(ep.key)
        meta["scene"].append(ep.scene)
        meta["task"].append(ep.task)
        meta["timestep"].append(t)

    def batch(self, images: torch.Tensor, text_pad_id: int = 0, fast_pad_id: int = 0) -> Batch:
        """The Batch of the rows added; ``images``: the [B, C, R, R, 3] buffer they were decoded into."""
        n = self.n
        _assert_finite(self.state[:n], self.actions[:n], self.meta["key"])
        text, text_mask = _pad_tokens(self.text, text_pad_id)
        subtask, subtask_mask = _pad_tokens(self.subtask, text_pad_id)
        fast, fast_mask = _pad_tokens(self.fast, fast_pad_id)
        if self.arena is not None:
            text, text_mask = self._in_arena("text_tokens", text), self._in_arena("text_mask", text_mask)
            subtask = self._in_arena("subtask_tokens", subtask)
            subtask_mask = self._in_arena("subtask_mask", subtask_mask)
            fast, fast_mask = self._in_arena("fast_tokens", fast), self._in_arena("fast_mask", fast_mask)
        arrays = {k: getattr(self, k)[:n] for k in ("image_mask", "state", "state_mask", "actions",
                                                    "action_dim_mask", "action_time_mask", "embodiment")}
        tokens = {"text_tokens": text, "text_mask": text_mask, "subtask_tokens": subtask,
                  "subtask_mask": subtask_mask, "fast_tokens": fast, "fast_mask": fast_mask}
        shapes = {**{k: a.shape for k, a in arrays.items()}, **{k: tuple(t.shape) for k, t in tokens.items()}}
        # where each field lies in the arena, for buffers.worker_message
        self.layout = {k: (offset, dtype, shapes[k]) for k, (offset, dtype) in self.offsets.items()}
        rows = {k: torch.from_numpy(a) for k, a in arrays.items()}
        return Batch(images=images[:n].permute(0, 1, 4, 2, 3), text_tokens=text, text_mask=text_mask,
                     fast_tokens=fast, fast_mask=fast_mask, subtask_tokens=subtask, subtask_mask=subtask_mask,
                     meta=self.meta, **rows)
