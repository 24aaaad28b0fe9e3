"""The text a sample's prompt tokens hold: one function for training batches and inference.

``prompt_tokens`` is what every path calls -- the loader's ``collate.BatchFields.add``, and
``collate.sample_fields`` (``build_sample``), through which ``eval.policy.episode_sample`` builds
the batches of closed-loop evaluation, offline evaluation and the policy server -- so the tokens a
model was trained on and the tokens it is served cannot drift apart.

* ``model.state_mode`` discrete / continuous: the instruction, ``encode(text, add_bos=True,
  add_eos=False)``, tokenized once per distinct text (a cache shared by a worker's episodes).
* ``model.state_mode=text`` (a loaded LeRobot / openpi π0.5, which has no state parameters): the
  prompt π0.5 was trained on, :func:`pi05_prompt` ``(instruction, state)`` = "Task: ...,
  State: <256-bin ids>;\\nAction: ", where ``state`` is the sample's own timestep's state,
  normalized and zero-padded to ``data.max_state_dim`` (``collate.episode_arrays``' ``state_pad``):
  LeRobot's Pi05PrepareStateTokenizerProcessorStep normalizes, pads to ``max_state_dim``, then
  bins, and so does openpi's PaligemmaTokenizer. Same encode call (BOS first, no EOS). It changes
  every timestep, so it is tokenized per sample (no cache: ~21 us a sample at 32 state dims with
  a sentencepiece tokenizer, vs ~0.3 us for a cached instruction).

Nothing truncates a prompt (``model.text_len`` is a nominal length for the FLOPs estimate);
``config.checks`` refuses a text_len shorter than a state_mode=text prompt.
"""
from __future__ import annotations

import numpy as np

from megavla.data_shards.format import EpisodeFormatError

STATE_MODES = ("discrete", "continuous", "text")


def pi05_prompt(task: str, state: np.ndarray) -> str:
    """The prompt π0.5 was trained on (LeRobot's Pi05PrepareStateTokenizerProcessorStep / openpi's
    PaligemmaTokenizer): the normalized state in [-1, 1] as 256 bins written as decimal text.
    Tokenize with PaliGemma's tokenizer (BOS first, no EOS)."""
    bins = np.digitize(np.asarray(state, dtype=np.float32), bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1
    cleaned = task.strip().replace("_", " ").replace("\n", " ")
    return f"Task: {cleaned}, State: {' '.join(map(str, bins))};\nAction: "


class SampleError(EpisodeFormatError):
    """A library refused one sample (a tokenizer on its text or action chunk): a counted skip."""


def encode_or_skip(tok, value, where: str, what: str, **kw) -> list[int]:
    try:
        return list(tok.encode(value, **kw))
    except Exception as e:  # noqa: BLE001 - whatever a tokenizer library raises, one sample is skipped
        raise SampleError(f"{where}: {what} tokenizer failed ({type(e).__name__}: {e})") from None


def encode_text(tok, text: str, where: str, **kw) -> list[int]:
    return [] if tok is None or not text else encode_or_skip(tok, text, where, "text", **kw)


def cached_text(tok, cache: dict, role: str, text: str, where: str, **kw) -> list[int]:
    """Token ids of ``text`` (instruction or subtask), tokenized once per distinct text in ``cache``."""
    key = (role, text)
    ids = cache.get(key)
    if ids is None:
        ids = encode_text(tok, text, where, **kw)
        cache[key] = ids
    return ids


def check_state_mode(state_mode: str | None) -> None:
    """None means "not text" to the data path (the model's own preset decides the rest)."""
    if state_mode is not None and state_mode not in STATE_MODES:
        raise ValueError(f"state_mode={state_mode!r}: choose one of {STATE_MODES} (model.state_mode)")


def prompt_tokens(tok, token_cache: dict, instruction: str, state: np.ndarray, state_mode: str | None,
                  where: str) -> list[int]:
    """The text tokens of one sample. ``state``: its normalized state, zero-padded to max_state_dim
    (read only for state_mode=text). Raises SampleError (the tokenizer refused the text)."""
    if state_mode == "text":
        if tok is None:   # config.checks refuses this before a run; the tokens would be empty
            return []
        return encode_or_skip(tok, pi05_prompt(instruction, state), f"{where} instruction + state",
                              "text", add_bos=True, add_eos=False)
    return cached_text(tok, token_cache, "instruction", instruction, where, add_bos=True, add_eos=False)


def model_state_mode(model_cfg) -> str:
    """``model.state_mode`` with the preset's default filled in (presets.resolve)."""
    from megavla.model.presets import resolve
    return resolve(model_cfg).state_mode
