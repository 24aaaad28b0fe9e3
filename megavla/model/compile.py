"""torch.compile of the VLA: `train.compile` (none | blocks | full) for training, and a compiled
`sample_actions` for `load_policy(compile=True)` / `megavla serve --compile`.

* ``blocks`` (torchtitan's way): every transformer block is compiled in place, so parameter names,
  state_dict keys and checkpoints are those of the eager model (no ``_orig_mod.`` prefix). The
  vision tower's SiglipLayers get ``layer.compile()``; the backbone + expert decoder layers, which
  run pairwise through ``gemma.shared_layer`` (no module of their own), get one compiled layer
  function that every layer shares (``GemmaStack.layer_call``). Activation checkpointing is
  applied inside the compiled decoder layer (checkpoint first, then compile, as torchtitan: the
  compiler sees the recompute region), and so is the vision tower's (each SiglipLayer's forward
  becomes a compiled function that checkpoints the layer; the tower's own checkpoint is turned off).
* ``full``: the model's whole forward after its host-side batch check (``VLA.compute_losses``) as
  one graph, forward and backward: no graph breaks (the attention layout's order check becomes an
  assert op, the vision tower runs every camera and zeroes the absent ones instead of selecting the
  present ones by a data-dependent index). Set on the instance: same names again.

Both modes mark a batch's token lengths (text, subtask, FAST) dynamic (`DynamicTokenLengths`): the
data pipeline pads each batch to its longest sample, so they change every step; one compile covers
them all.

ZeRO-3 gathers and releases every module's parameters in module hooks, which a compiled region
traces: each hook is a graph break (DeepSpeed marks them `torch.compiler.disable`) and its
per-module state guards recompile (measured, tiny, 1 CPU rank, decoder layers compiled: first step
461 s, second 32 s, third 0.81 s vs 0.28 s eager; losses equal). DeepSpeed's own answer is its
``engine.compile`` ("deepcompile"), not this. So under ZeRO-3, ``blocks`` compiles the vision
tower's layers only (same machine: first step 70 s, then 0.13-0.26 s vs 0.28-0.33 s eager, equal
losses; dynamo still gives up on some DeepSpeed hook frames at its recompile limit, which only
leaves those hooks eager) and runs the decoder layers eagerly (logged), and ``full`` -- the whole
forward as one region, every hook inside -- is refused at config load (``TrainConfig.validate``).

Nothing here is imported with compile off: torch._dynamo / inductor cost ~1.5-3 CPU-s of a process
start (megavla/train/deepspeed_patches.py), and `import_compiler` is the one place that pays it.

Inductor's compiled kernels and FX graphs are cached on disk across processes and runs (on by
default: ``torch._inductor.config.fx_graph_cache``) under ``$TORCHINDUCTOR_CACHE_DIR``, default
``/tmp/torchinductor_$USER``; nothing here sets a per-run directory, so a second run of the same
model compiles in seconds instead of a minute (measured, tiny: 50 s cold, 4.6 s warm). Where /tmp is
per job (a SLURM job_container tmpfs), set TORCHINDUCTOR_CACHE_DIR to a persistent directory in the
job's environment for the cache to outlive the job; the launchers leave the variable alone.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import sys

import torch

log = logging.getLogger(__name__)

COMPILE_MODES = ("none", "blocks", "full")


def check_compile_config(mode: str, zero_stage: int) -> None:
    """Config-load check of `train.compile` (raises megavla.config.core.ConfigError)."""
    from megavla.config.core import ConfigError
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile={mode!r} is not a compile mode; choose one of {', '.join(COMPILE_MODES)} "
                          "(e.g. train.compile=blocks)")
    if mode == "full" and zero_stage == 3:
        raise ConfigError("compile=full cannot run under zero_stage=3: ZeRO-3 gathers each layer's parameters "
                          "in module hooks inside the forward, which a whole-model graph cannot hold; use "
                          "train.compile=blocks (or none) with ZeRO-3, or zero_stage<=2 with compile=full")


def import_compiler() -> None:
    """Import torch._dynamo before the model and engine exist: the trainer's eager-only shortcuts
    (deepspeed_patches.avoid_dynamo_import, compiler_disable_as_identity) step aside in a process
    that has it, so DeepSpeed's "do not trace" marks stay real for the compiler."""
    import torch._dynamo  # noqa: F401
    log.info("torch.compile on: inductor cache at %s (reused across runs)", inductor_cache_dir())


def inductor_cache_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    return cache_dir()


def _layer_body(bb_layer, ex_layer, bb, ex, ctx, checkpoint: bool):
    from .gemma import shared_layer
    if checkpoint:
        return torch.utils.checkpoint.checkpoint(shared_layer, bb_layer, ex_layer, bb, ex, ctx, 0,
                                                 use_reentrant=False)
    return shared_layer(bb_layer, ex_layer, bb, ex, ctx, 0)


def _checkpointed_forward(layer, x):
    forward = type(layer).forward
    if layer.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, layer, x, use_reentrant=False)
    return forward(layer, x)


class CompiledLayerCall:
    """The compiled decoder layer shared by all layers of a model. The layer's own cache entry is
    handed in as a one-entry cache (index 0), so the layer index is not a traced constant: every
    layer of the same shape reuses one graph instead of recompiling per layer."""

    def __init__(self) -> None:
        self.fn = torch.compile(_layer_body)

    def __call__(self, bb_layer, ex_layer, bb, ex, ctx, index: int, checkpoint: bool):
        if ctx.cache is not None:
            ctx = dataclasses.replace(ctx, cache=[ctx.cache[index]])
        return self.fn(bb_layer, ex_layer, bb, ex, ctx, checkpoint)


def compile_model(model: torch.nn.Module, mode: str, zero_stage: int = 0) -> None:
    """Compile ``model`` in place for training (`train.compile`); names and state_dict keys stay."""
    if mode == "none":
        return
    check_compile_config(mode, zero_stage)
    if "torch._dynamo" not in sys.modules:
        import_compiler()
    # Token lengths change every batch: one graph for all of them (DynamicTokenLengths).
    model.forward = DynamicTokenLengths(model.forward)
    # The attention layout memoizes its masks (kernels/attention.py AttentionLayout._cache) on first
    # use, i.e. inside the first layer; under activation checkpointing dynamo refuses that write in
    # the checkpointed region (and runs the whole layer eagerly) unless told that the backward's
    # recompute need not replay it -- it need not: a memo, recomputed the same if absent.
    import torch._dynamo.config as dynamo_config
    dynamo_config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    if mode == "full":
        # The forward after its host-side batch check (losses.check_batch reads token ids on the
        # host: a graph break); an instance attribute, so parameter names and state_dict keys stay.
        model.compute_losses = torch.compile(model.compute_losses)
        log.info("compile=full: the model's forward is compiled (first step includes compiling)")
        return
    vision = getattr(model, "vision", None)
    n_vision = 0
    if getattr(vision, "checkpoint_layers", False):
        # Checkpoint first, then compile (torchtitan's order): the tower's own checkpoint around a
        # compiled layer failed its recompute check ("a different number of tensors was saved during
        # the original forward and recomputation", pytorch#166926); so the tower stops checkpointing
        # and each layer's forward becomes a compiled function that checkpoints itself.
        vision.checkpoint_layers = False
        for layer in vision.layers:
            layer.forward = torch.compile(functools.partial(_checkpointed_forward, layer))
            n_vision += 1
    else:
        for layer in getattr(vision, "layers", ()):
            layer.compile()
            n_vision += 1
    stacks = [s for s in (getattr(model, "backbone", None), getattr(getattr(model, "expert", None), "stack", None))
              if s is not None]
    if zero_stage == 3:
        log.info("compile=blocks under ZeRO-3: %d vision layers compiled; the decoder layers stay eager "
                 "(their parameters are gathered by hooks inside the shared layer)", n_vision)
        return
    call = CompiledLayerCall()
    for stack in stacks:
        stack.layer_call = call
    log.info("compile=blocks: %d vision layers and the %d-layer shared decoder compiled per block "
             "(first step includes compiling)", n_vision, len(stacks[0].layers) if stacks else 0)


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far (dynamo + AOT + inductor, forward and
    backward), from torch's own compile metrics; 0.0 when nothing was compiled."""
    if "torch._dynamo" not in sys.modules:
        return 0.0
    from torch._dynamo.utils import compilation_time_metrics
    # Top-level entries only: dynamo's per-frame compile (which holds the forward's inductor compile,
    # and the backward's where AOT autograd compiles it ahead, as with dynamic shapes) and the lazy
    # backward compiles AOT autograd runs at a first backward ("backward._backward_impl"). Not
    # "bw_compiler": nested in one of those (counting it too gave 79-86 s for a 56-63 s first step).
    total = 0.0
    for name, times in compilation_time_metrics.items():
        if name in ("_compile.compile_inner", "compile_inner", "backward._backward_impl"):
            total += sum(times)
    return total


def log_first_step_compile(mode: str) -> None:
    """Once, after the first step (whose time the launch line reports): how much of it compiled."""
    log.info("compile=%s: the first step spent %.1f s compiling (inductor cache %s; a second run of the "
             "same model and shapes reads it)", mode, compile_seconds(), inductor_cache_dir())


# ---------------------------------------------------------------------------------------- inference
# Text lengths are padded up to these (then to the next power of two), batch rows to a power of two:
# the compiled graphs are static per bucket (no dynamic-shape kernels), so a stream of prompts of
# varying length costs a handful of compiles, not one per length.
TEXT_BUCKETS = (16, 32, 48, 64)
# Distinct (rows, text) buckets a server may meet: 4 row buckets (max_batch 8) x ~5 text buckets.
INFERENCE_RECOMPILE_LIMIT = 32


def bucket_text_length(length: int) -> int:
    for bucket in TEXT_BUCKETS:
        if length <= bucket:
            return bucket
    return 1 << (length - 1).bit_length()


def bucket_rows(rows: int) -> int:
    return 1 << (rows - 1).bit_length()


def pad_batch(batch, rows: int, text_length: int):
    """``batch`` with its rows repeated up to ``rows`` (the last row; sliced off the output) and its
    text padded with invalid tokens up to ``text_length`` (masked everywhere: positions count valid
    tokens only, attention never reads an invalid key), ``meta`` dropped (the compiled function would
    guard on its contents)."""
    from megavla.batch import Batch
    tensors = batch.tensors()
    extra = rows - batch.batch_size
    if extra:
        tensors = {k: torch.cat([v, v[-1:].expand(extra, *v.shape[1:])]) for k, v in tensors.items()}
    pad = text_length - tensors["text_tokens"].shape[1]
    if pad:
        tensors["text_tokens"] = torch.nn.functional.pad(tensors["text_tokens"], (0, pad))
        tensors["text_mask"] = torch.nn.functional.pad(tensors["text_mask"], (0, pad), value=False)
    return Batch(**tensors)


class DynamicTokenLengths:
    """The model's forward with the token columns of a batch (text, subtask, FAST) marked dynamic.
    The data pipeline pads each batch to its longest sample, so these lengths change every step: a
    static graph recompiles per length (then dynamo turns dynamic anyway). Measured, the mini
    finetune (tiny, full): marked dynamic, one 60 s compile, then 35.3 ms/step; padded to static
    lengths (a high-water mark in multiples of 16: FAST 96 where batches hold ~60-90), 41.3 ms/step,
    no faster than eager's 41.7. ``meta`` is dropped: the compiled code would guard on its strings."""

    def __init__(self, forward) -> None:
        self.forward = forward

    def __call__(self, batch, *args, **kwargs):
        from megavla.batch import Batch
        batch = Batch(**batch.tensors())
        for field in ("text", "subtask", "fast"):
            torch._dynamo.maybe_mark_dynamic(getattr(batch, f"{field}_tokens"), 1)
            torch._dynamo.maybe_mark_dynamic(getattr(batch, f"{field}_mask"), 1)
        return self.forward(batch, *args, **kwargs)


class CompiledSampler:
    """``sample_actions`` with its two hot parts compiled: the prefix encode (cameras + text + state ->
    per-layer K/V cache, once per call) and the Euler step over that cache (``num_steps`` times),
    each on shape-bucketed inputs (``pad_batch``). Equal to ``model.sample_actions`` within fp32
    rounding (tests/test_compile.py). With action_conditioning=subtask the greedy subtask decode
    grows its cache token by token: that path runs eagerly (``model.sample_actions``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        from . import inference
        if "torch._dynamo" not in sys.modules:
            import_compiler()
        self.model = model
        self.encode = torch.compile(inference.encode_prefix, dynamic=False)
        self.step = torch.compile(inference.euler_step, dynamic=False)
        if model.actions_read_subtask:
            log.info("compiled sample_actions: with action_conditioning=subtask the flow reads a cache that "
                     "grows with the decoded subtask: this model samples eagerly")

    @torch.no_grad()
    def sample_actions(self, batch, num_steps: int = 10, noise: torch.Tensor | None = None,
                       return_subtask: bool = False):
        """As ``VLA.sample_actions(batch, num_steps, noise, return_subtask=...)`` (KV-cached)."""
        model = self.model
        if model.actions_read_subtask:
            return model.sample_actions(batch, num_steps=num_steps, noise=noise, return_subtask=return_subtask)
        if num_steps <= 0:
            raise ValueError(f"sample_actions: num_steps={num_steps} must be >= 1")
        cfg, b = model.cfg, batch.batch_size
        shape = (b, cfg.chunk_length, cfg.action_dim)
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"sample_actions: noise {tuple(noise.shape)} must be [B, model.chunk_length, "
                             f"model.action_dim] = {shape}")
        dev = batch.actions.device
        noise = torch.randn(shape, device=dev) if noise is None else noise.to(dev, torch.float32)
        rows = bucket_rows(b)
        padded = pad_batch(batch, rows, bucket_text_length(batch.text_tokens.shape[1]))
        if rows > b:
            noise = torch.cat([noise, noise[-1:].expand(rows - b, *shape[1:])])
        used = padded.action_dim_mask[:, None, :]
        x, dt = noise.clone(), -1.0 / num_steps
        with torch._dynamo.config.patch(recompile_limit=INFERENCE_RECOMPILE_LIMIT):
            context, _, cache = self.encode(model, padded)
            start = context.valid.long().sum(dim=1)
            for step in range(num_steps):
                t = torch.full((rows,), 1.0 + step * dt, device=dev)
                x = self.step(model, padded, x, noise, used, t, dt, context, cache, start)
        actions = torch.where(used, x, torch.zeros_like(x))[:b]
        return (actions, None) if return_subtask else actions
