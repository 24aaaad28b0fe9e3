"""Closed-loop evaluation in the mini-world: run a policy for M episodes per scene x task combo.

A policy is anything with ``reset(world)`` and ``act(world) -> action [world.action_dim]``
(:class:`megavla.eval.policy.VLAPolicy` for trained models; :class:`ClientPolicy` for a policy behind
openpi's ``infer(obs)`` contract, e.g. ``megavla serve`` through ``openpi_client``; :class:`ScriptedPolicy`
and :class:`HoldPolicy` here as the upper and lower reference points). The world is
``data_shards.miniworld.MiniWorld``, the one the shard generator records demonstrations in.

Evaluation episodes use world seeds from :data:`EVAL_SEED_BASE` upwards: the generator draws its
world seeds from ``[0, 2**31)`` per episode, so an evaluation start state is a fresh draw of the same
distribution (object jitter, start pose), not a replay of a training episode.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
from tqdm import tqdm

from megavla.data_shards.miniworld import MiniWorld
from megavla.data_shards.synth import MAX_STEPS, ScriptedExpert

from .stats import wilson_interval  # noqa: F401  (re-exported: callers use closed_loop.wilson_interval)
from .traces import EpisodeTrace

log = logging.getLogger(__name__)

EVAL_SEED_BASE = 1_000_003


class Policy(Protocol):
    def reset(self, world: MiniWorld) -> None: ...

    def act(self, world: MiniWorld) -> np.ndarray: ...


def parse_combo(combo: str) -> tuple[int, int]:
    """'3:1' -> (3, 1), with an error that says the expected form."""
    try:
        scene, task = combo.split(":")
        return int(scene), int(task)
    except ValueError:
        raise ValueError(f"combo {combo!r} must look like 'scene:task' (e.g. '3:1')") from None


@dataclass
class EpisodeResult:
    scene: int
    task: int
    seed: int
    success: bool
    steps: int


class ScriptedPolicy:
    """The generator's scripted expert as a policy (re-planned from the world's state at reset)."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def reset(self, world: MiniWorld) -> None:
        self.expert = ScriptedExpert(world, np.random.default_rng([self.seed, world.seed]))

    def act(self, world: MiniWorld) -> np.ndarray:
        out = self.expert.act()
        return self.expert.hold_action() if out is None else out[0]


class OracleChunkPolicy:
    """The scripted expert as a *chunked* policy, through the same transforms a learned policy's
    output goes through: the harness regression reference (it must succeed ~always).

    Every ``execute_k`` steps it rolls the expert ``chunk_length`` steps ahead in a copy of the world
    (the world's step is deterministic), optionally sends the chunk through ``normalizer``
    (normalize -> unnormalize) and a FAST tokenizer (encode -> decode, in normalized units, as the
    training targets are), and executes the first ``execute_k`` actions. If this fails, the harness
    (chunking, normalization, tokenization, episode termination) is broken, not the model.
    """

    def __init__(self, chunk_length: int = 10, execute_k: int = 5, normalizer=None, fast_tokenizer=None,
                 seed: int = 0):
        if not 1 <= execute_k <= chunk_length:
            raise ValueError(f"execute_k={execute_k} must be in [1, chunk_length={chunk_length}]")
        if fast_tokenizer is not None and normalizer is None:
            raise ValueError("a FAST round trip needs the normalizer (FAST codes normalized actions)")
        self.H, self.k, self.seed = chunk_length, execute_k, seed
        self.normalizer, self.fast = normalizer, fast_tokenizer

    def reset(self, world: MiniWorld) -> None:
        self.expert = ScriptedExpert(world, np.random.default_rng([self.seed, world.seed]))
        self.queue: list[np.ndarray] = []

    def plan(self, world: MiniWorld) -> np.ndarray:
        sim_world, sim_expert = copy.deepcopy((world, self.expert))
        chunk, carried = [], None
        for i in range(self.H):
            if i == self.k:  # the expert's state once the executed prefix is done, bound to the real world
                carried = copy.deepcopy(sim_expert, {id(sim_world): world})
            out = sim_expert.act()
            action = sim_expert.hold_action() if out is None else out[0]
            chunk.append(action)
            sim_world.step(action)
        self.expert = carried if carried is not None else copy.deepcopy(sim_expert, {id(sim_world): world})
        chunk = np.asarray(chunk, np.float32)
        if self.normalizer is not None:
            normed = self.normalizer.normalize(chunk, world.embodiment, "actions")
            if self.fast is not None:
                normed = self.fast.decode(self.fast.encode(normed), self.H, chunk.shape[1])
            chunk = self.normalizer.unnormalize(np.asarray(normed, np.float32), world.embodiment, "actions")
        return chunk

    def act(self, world: MiniWorld) -> np.ndarray:
        if not self.queue:
            self.queue = list(self.plan(world)[: self.k])
        return self.queue.pop(0)


class HoldPolicy:
    """Never moves: the floor every learned policy should beat."""

    def reset(self, world: MiniWorld) -> None:
        pass

    def act(self, world: MiniWorld) -> np.ndarray:
        return np.zeros(world.action_dim)


class ClientPolicy:
    """Action chunking over an openpi-style policy: ``client.infer(obs) -> {"actions": [H, D]}``.

    ``metadata`` is what the server sent on connect (``get_server_metadata()``) or
    ``LoadedPolicy.metadata``; its observation schema says which keys carry the world's renders
    (HWC uint8), its end-effector state and the instruction."""

    def __init__(self, client, metadata: dict, execute_k: int = 5):
        H = int(metadata["chunk_length"])
        if not 1 <= execute_k <= H:
            raise ValueError(f"execute_k={execute_k} must be in [1, chunk_length={H}]")
        self.client, self.schema, self.execute_k = client, metadata["observation_schema"], execute_k
        self.metadata = metadata
        self.queue: list[np.ndarray] = []
        self.queries = 0

    def close(self) -> None:
        """Close the client's server connection, leaving the server a clean close frame. openpi's
        WebsocketClientPolicy has no close(): its connection is its ``_ws``, reached here only. A
        client without one (an in-process LoadedPolicy) has nothing to close."""
        connection = getattr(self.client, "_ws", None)
        if connection is not None:
            connection.close()

    def reset(self, world: MiniWorld) -> None:
        self.queue = []

    def observation(self, world: MiniWorld) -> dict:
        images = {key: world.render(cam) for cam, key in self.schema["images"].items() if cam in world.cameras}
        return {**images, self.schema["state"]: world.ee_state(), self.schema["prompt"]: world.instruction}

    def act(self, world: MiniWorld) -> np.ndarray:
        if not self.queue:
            chunk = np.asarray(self.client.infer(self.observation(world))["actions"])
            if chunk.ndim != 2 or chunk.shape[1] != world.action_dim:
                raise ValueError(f"policy returned actions of shape {list(chunk.shape)}; the world takes "
                                 f"[H, {world.action_dim}] ({world.embodiment})")
            self.queries += 1
            self.queue = list(chunk[: self.execute_k])
        return self.queue.pop(0)


def connect_policy_server(url: str, api_key: str | None, execute_k: int = 5) -> ClientPolicy:
    """A ClientPolicy over `megavla serve` at ``url`` (ws://HOST:PORT) through the unmodified
    openpi client; close it with ``.close()``. ValueError naming the url when it cannot connect."""
    try:
        from openpi_client.websocket_client_policy import WebsocketClientPolicy
    except ImportError:
        raise ValueError("--policy-server needs the openpi client: pip install openpi-client") from None
    from websockets.exceptions import WebSocketException
    try:
        client = WebsocketClientPolicy(url, api_key=api_key)
    except (OSError, WebSocketException) as e:  # refused, 401 (API key), not a websocket
        raise ValueError(f"--policy-server {url}: cannot connect: {e}") from None
    return ClientPolicy(client, client.get_server_metadata(), execute_k)


def run_episode(policy: Policy, scene: int, task: int, seed: int, *, image_size: int,
                max_steps: int = MAX_STEPS, embodiment: str = "robot/arm",
                traces: list[EpisodeTrace] | None = None, videos=None) -> EpisodeResult:
    """One episode; it ends at the first step where the task's success test holds. With ``traces``
    (a list), the episode's per-step trace (traces.EpisodeTrace) is appended to it; with ``videos``
    (videos.VideoRecorder), the episode is filmed when the recorder wants it."""
    world = MiniWorld(scene, task, embodiment, seed=seed, image_size=image_size)
    policy.reset(world)
    trace = EpisodeTrace.start(world) if traces is not None else None
    film = videos.begin(world) if videos is not None else None
    if film is not None:
        film.record(world)
    result = EpisodeResult(scene, task, seed, False, max_steps)
    for step in range(max_steps):
        action = np.asarray(policy.act(world), dtype=np.float64)
        if not np.isfinite(action).all():
            log.warning("scene %d task %d seed %d: non-finite action at step %d; episode counted as "
                        "a failure", scene, task, seed, step)
            result = EpisodeResult(scene, task, seed, False, step)
            break
        world.step(action)
        if trace is not None:
            trace.record(world, float(action[6]))
        if film is not None:
            film.record(world, float(action[6]))
        if world.success():
            result = EpisodeResult(scene, task, seed, True, step + 1)
            break
    if trace is not None:
        trace.success = result.success
        traces.append(trace)
    if videos is not None:
        videos.end(film, result.success)
    return result


def evaluate(policy: Policy, combos: list[str], episodes_per_combo: int, *, image_size: int,
             max_steps: int = MAX_STEPS, seed: int = 0, progress: bool = True,
             traces: list[EpisodeTrace] | None = None, videos=None) -> dict:
    """Success rate over ``episodes_per_combo`` episodes of each combo, with its Wilson 95% interval,
    per combo and overall. Returns a JSON-ready dict (``episodes`` lists every episode). With
    ``traces`` (a list), every episode's trace is appended to it, in the order of ``episodes_detail``;
    with ``videos`` (videos.VideoRecorder), the episodes it chooses are filmed (``videos.videos``)."""
    if episodes_per_combo <= 0:
        raise ValueError(f"episodes_per_combo={episodes_per_combo} must be positive")
    if not combos:
        raise ValueError("combos is empty: name at least one 'scene:task' to evaluate")
    jobs = [(*parse_combo(c), EVAL_SEED_BASE + 1000 * seed + e) for c in combos
            for e in range(episodes_per_combo)]
    results = [run_episode(policy, s, t, ws, image_size=image_size, max_steps=max_steps, traces=traces,
                           videos=videos)
               for s, t, ws in tqdm(jobs, desc="closed-loop", unit="ep", disable=not progress)]
    return summarize(results)


def eval_seeds(episodes_per_combo: int, seed: int = 0) -> set[int]:
    """The world seeds ``evaluate`` gives its episodes (the same for every combo)."""
    return {EVAL_SEED_BASE + 1000 * seed + e for e in range(episodes_per_combo)}


def summarize(results: list[EpisodeResult]) -> dict:
    def block(rs: list[EpisodeResult]) -> dict:
        k = sum(r.success for r in rs)
        lo, hi = wilson_interval(k, len(rs))
        return {"successes": k, "episodes": len(rs), "success_rate": k / len(rs) if rs else 0.0,
                "ci95": [lo, hi]}

    per_combo: dict[str, list[EpisodeResult]] = {}
    for r in results:
        per_combo.setdefault(f"{r.scene}:{r.task}", []).append(r)
    return {**block(results), "per_combo": {c: block(rs) for c, rs in per_combo.items()},
            "episodes_detail": [asdict(r) for r in results]}
