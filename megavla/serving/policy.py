"""A trained policy behind openpi's ``infer(obs) -> {"actions": [H, D], ...}`` contract, in process.

``megavla.load_policy(path)`` returns a :class:`LoadedPolicy`; ``megavla serve`` puts the same object
behind a websocket. Both parse the observation with the schema (megavla/serving/schema.py), build the
batch with the training pipeline's code (``eval.policy.frames_episode`` + ``episode_sample``) and
sample through the KV-cached ``VLA.sample_actions``; actions come back unnormalized, native dims only.

Noise: each caller owns a ``torch.Generator`` (the in-process policy one, the server one per
connection), seeded with ``seed`` and drawn once per request as ``[1, H, A]``, the way
``eval.policy.VLAPolicy`` draws it; a request's actions therefore do not depend on which other
requests share its batch (beyond float rounding of the batched matmuls).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megavla.data_shards.format import EpisodeFormatError
from megavla.eval.policy import LoadedCheckpoint, collate, episode_sample, frames_episode, load_checkpoint

from .schema import ACTION_SPACE, Observation, ObservationSchema, ResolvedSchema, load_schema

log = logging.getLogger(__name__)

# Weights' dtype at inference; bf16 halves memory and is what GPUs run fast (the sampler keeps the
# noise and the integrated actions in fp32).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Request:
    observation: Observation
    noise: torch.Tensor  # [1, H, A] fp32, CPU


class LoadedPolicy:
    """``infer(obs)`` / ``infer_batch(requests)`` over one loaded checkpoint or export."""

    def __init__(self, loaded: LoadedCheckpoint, schema: ObservationSchema | None = None, *,
                 device: str = "cpu", flow_steps: int = 10, subtask: bool = False, seed: int = 0,
                 dtype: str = "fp32", compile: bool = False):
        if flow_steps < 1:
            raise ValueError(f"flow_steps={flow_steps} must be >= 1")
        d = loaded.cfg.data
        schema = schema or ObservationSchema()
        emb = schema.embodiment
        if loaded.normalizer is not None:
            state_dim, action_dim = loaded.normalizer.dim(emb, "state"), loaded.normalizer.dim(emb, "actions")
        else:  # normalization "none": the native dims are unknown, serve the padded ones
            state_dim, action_dim = d.max_state_dim, d.max_action_dim
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: choose one of {sorted(DTYPES)}")
        if subtask and loaded.text_tokenizer is None:
            raise ValueError(f"{loaded.path}: subtask prediction needs the text tokenizer (tokenizers/)")
        self.loaded, self.device = loaded, torch.device(device)
        self.flow_steps, self.subtask, self.seed = flow_steps, subtask, seed
        self.schema = ResolvedSchema(schema, list(d.cameras), state_dim, action_dim)
        self.schema.bound_state(loaded.normalizer, d.max_abs_normalized)  # refused before batching
        self.dtype = dtype
        self.model = loaded.model.to(self.device, DTYPES[dtype]).eval()
        # compile: sample_actions with its prefix encode and flow step compiled (megavla/model/compile.py;
        # shape buckets, so varying prompt lengths and batch sizes compile a few times, not per request)
        self.compiled = compile
        self._sampler = self.model
        if compile:
            from megavla.model.compile import CompiledSampler
            self._sampler = CompiledSampler(self.model)
        self.generator = self.new_generator()

    # ------------------------------------------------------------------ description
    @property
    def metadata(self) -> dict[str, Any]:
        """What a client needs to know (sent by the server on connect)."""
        cfg, s = self.loaded.cfg, self.schema
        return {"server": "megavla", "preset": cfg.model.preset, "checkpoint": self.loaded.path.name,
                "step": self.loaded.step, "embodiment": s.schema.embodiment,
                "action_dim": s.action_dim, "action_names": s.action_names, "action_space": ACTION_SPACE,
                "chunk_length": cfg.data.chunk_length, "cameras": list(s.cameras),
                "image_size": cfg.data.image_size, "flow_steps": self.flow_steps, "subtask": self.subtask,
                "dtype": self.dtype,
                "observation_schema": s.describe()}

    # ------------------------------------------------------------------ requests
    def new_generator(self, seed: int | None = None) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed if seed is None else seed)

    def request(self, obs: Any, generator: torch.Generator) -> Request:
        """Parse ``obs`` (raises schema.ObservationError) and draw its noise from ``generator``."""
        observation = self.schema.parse(obs)
        d = self.loaded.cfg.data
        return Request(observation, torch.randn((1, d.chunk_length, d.max_action_dim), generator=generator))

    def infer(self, obs: dict) -> dict:
        """One observation -> {"actions": float32 [H, D], "subtask"?: str, "policy_timing": {...}}."""
        result = self.infer_batch([self.request(obs, self.generator)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def reset(self) -> None:
        """openpi's BasePolicy API; the policy keeps no per-episode state (the noise stream runs on)."""

    def infer_batch(self, requests: list[Request]) -> list[dict | Exception]:
        """One forward for all requests; a request whose input cannot be built gets its exception in
        its slot and the others are served without it."""
        start = time.perf_counter()
        s = self.schema
        results: list[dict | Exception | None] = [None] * len(requests)
        samples, kept = [], []
        for i, req in enumerate(requests):
            obs = req.observation
            try:
                ep = frames_episode(s.schema.embodiment, obs.prompt, obs.state, obs.images, s.action_dim)
                samples.append(episode_sample(self.loaded, ep, 0))
                kept.append(i)
            except (EpisodeFormatError, ValueError, RuntimeError) as e:  # e.g. a frame JPEG refuses
                results[i] = e
        if not kept:
            return results
        batch = collate(self.loaded, samples).to(self.device)
        noise = torch.cat([requests[i].noise for i in kept]).to(self.device)
        prepared = time.perf_counter()
        texts, mcfg = None, self.loaded.cfg.model
        if self.subtask and self.model.actions_read_subtask:
            # The text returned is the one the actions were conditioned on (action_conditioning=subtask).
            chunks, subtask = self._sampler.sample_actions(batch, num_steps=self.flow_steps, noise=noise,
                                                           return_subtask=True)
            texts = self._decode(*subtask)
        else:
            chunks = self._sampler.sample_actions(batch, num_steps=self.flow_steps, noise=noise)
            if self.subtask:
                texts = self._decode(*self.model.predict_subtask(batch, max_len=mcfg.subtask_len,
                                                                 eos_id=mcfg.subtask_eos_id))
        chunks = chunks.float().cpu()
        if self.loaded.normalizer is not None:
            chunks = self.loaded.normalizer.unnormalize(chunks, s.schema.embodiment, "actions")
        actions = chunks[:, :, : s.action_dim].numpy()
        done = time.perf_counter()
        timing = {"prepare_ms": (prepared - start) * 1e3, "model_ms": (done - prepared) * 1e3,
                  "batch_size": len(kept)}
        for j, i in enumerate(kept):
            out: dict[str, Any] = {"actions": np.ascontiguousarray(actions[j]), "policy_timing": dict(timing)}
            if texts is not None:
                out["subtask"] = texts[j]
            results[i] = out
        return results

    def _decode(self, ids, valid) -> list[str]:
        tok = self.loaded.text_tokenizer
        return [tok.decode([int(i) for i, v in zip(row, m) if v]) for row, m in zip(ids.tolist(), valid.tolist())]


def load_policy(path: str | Path, *, device: str = "cpu", flow_steps: int = 10, subtask: bool = False,
                schema: str | Path | ObservationSchema | None = None, seed: int = 0,
                dtype: str = "fp32", threads: int | None = None, compile: bool = False) -> LoadedPolicy:
    """An export (``megavla export``), a checkpoint or a run dir -> :class:`LoadedPolicy`::

        policy = megavla.load_policy("runs/mine/export")
        actions = policy.infer({"observation/images/head": rgb, ..., "observation/state": state,
                                "prompt": "put the red block in the bowl"})["actions"]   # [H, D]

    ``threads``: torch CPU threads of this process (megavla/eval/threads.py): on the CPU, 1 unless
    given here or OMP_NUM_THREADS is set (0 = torch's own setting); on a GPU only when given.
    ``compile``: torch.compile the sampler (megavla/model/compile.py CompiledSampler; equal to eager
    within fp32 rounding); the first requests of each shape bucket pay the compile (seconds from
    inductor's on-disk cache, about a minute cold on a CPU).
    """
    from megavla.eval.threads import use_inference_threads
    if torch.device(device).type == "cpu" or threads is not None:
        use_inference_threads(threads)
    loaded = load_checkpoint(path)
    if not isinstance(schema, ObservationSchema):
        schema = load_schema(schema, loaded.path)
    return LoadedPolicy(loaded, schema, device=device, flow_steps=flow_steps, subtask=subtask, seed=seed,
                        dtype=dtype, compile=compile)
