"""DeepSpeed engine from our TrainConfig: process group, optimizer groups, schedule, ZeRO config."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
import types
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from megavla.config.train import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _skip_shm_comm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory comm op on CPU at init (~46 s, see platform-facts).
    We only use gloo collectives, so replace the builder with a no-op before the backend exists."""
    import importlib
    # (not `import deepspeed.comm.torch as m`: that resolves to the `torch` attribute of
    # deepspeed.comm, which is the torch package itself)
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def _skip_deepspeed_triton_import() -> None:
    """DeepSpeed's engine imports its Triton ops (AutoEP's ReplacementSourceMap lives beside them)
    on every `initialize`, and their shared module imports triton (~0.08 CPU-s of every process
    start) only to learn that no GPU backend is active. A CPU-only torch has none, so we register
    that module with its answer on such a build: `_TRITON_AVAILABLE` False (every DeepSpeed Triton
    kernel is defined and used under that flag), triton and tl None. GPU builds are left alone."""
    name = "deepspeed.ops.triton_ops._triton"
    if torch.version.cuda is not None or torch.version.hip is not None or name in sys.modules:
        return
    module = types.ModuleType(name, "DeepSpeed's Triton availability on a CPU-only torch: none "
                                    "(megavla.train.engine._skip_deepspeed_triton_import)")
    module._TRITON_AVAILABLE, module.triton, module.tl = False, None, None
    module.is_triton_available = lambda: False
    sys.modules[name] = module


def init_distributed(backend: str = "auto") -> DistInfo:
    """Join (or create) the process group from the usual env (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT), set by torchrun, our local launcher or the SLURM launcher. Without that
    env this is a one-process run."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    # One process needs no rendezvous: an in-memory store instead of a TCP port that another
    # program can take between free_port() and the bind (EADDRINUSE on a busy machine).
    single_store = os.environ["WORLD_SIZE"] == "1" and "MASTER_PORT" not in os.environ
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # Said up front, DeepSpeed skips its "Setting accelerator to CPU ... unable to detect" warning.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _skip_deepspeed_triton_import()
        _skip_shm_comm_build()
    # DeepSpeed 0.19 calls torch's deprecated all_gather_into_tensor / reduce_scatter_tensor: one
    # FutureWarning per rank per run that the user can do nothing about.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed",
                            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    import deepspeed
    if not torch.distributed.is_initialized():
        if single_store:
            torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend=backend)     # over the group above when there is one
    return DistInfo(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
                    local_rank=local_rank, device=device)


def shutdown_distributed(wait_for_peers: bool = True) -> None:
    """End the process group at process exit (avoids NCCL's "not destroyed" warning).

    `wait_for_peers` (a clean exit that every rank reaches): barrier first. Rank 0 hosts the
    rendezvous store; when it exited while a peer was still tearing down its group, the peer's gloo
    threads died with "terminate called without an active exception" (SIGABRT, exit 134 instead of
    the stop/preemption code). After an error on one rank only, do not wait: the peers may never come.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if wait_for_peers and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def grad_accum_steps(cfg: TrainConfig, micro_batch: int, world_size: int) -> int:
    if cfg.global_batch_size is None:
        return cfg.grad_accum
    per_step = micro_batch * world_size
    if cfg.global_batch_size % per_step:
        raise ValueError(f"train.global_batch_size={cfg.global_batch_size} is not a multiple of "
                         f"data.batch_size x world_size = {micro_batch} x {world_size}; change one of them")
    return cfg.global_batch_size // per_step


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based): linear warmup, then cosine."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay = cfg.decay_steps or max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def apply_freeze(model: nn.Module, prefixes: list[str]) -> int:
    """requires_grad=False for parameters whose name starts with one of `prefixes`; returns count."""
    if not prefixes:
        return 0
    frozen = 0
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(n.startswith(prefix) for n in names):
            raise ValueError(f"train.freeze: no parameter name starts with {prefix!r}; "
                             f"top-level modules are {sorted({n.split('.')[0] for n in names})}")
    for name, p in model.named_parameters():
        if any(name.startswith(prefix) for prefix in prefixes):
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norm scales and other vectors get no weight decay."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _disabled_dynamo_functions(obj, depth: int = 3) -> list:
    """The plain functions that `torch._disable_dynamo` wrappers reachable from `obj` (through
    functools.wraps / closures) wrap."""
    marker = torch._disable_dynamo(lambda: None).__code__
    found, seen = [], set()

    def walk(o, d):
        if d < 0 or id(o) in seen:
            return
        seen.add(id(o))
        code = getattr(o, "__code__", None)
        if code is marker:
            found.append(o.__closure__[code.co_freevars.index("fn")].cell_contents)
            return
        for cell in getattr(o, "__closure__", None) or ():
            try:
                walk(cell.cell_contents, d - 1)
            except ValueError:   # an empty cell
                pass
        if getattr(o, "__wrapped__", None) is not None:
            walk(o.__wrapped__, d - 1)

    walk(obj, depth)
    return found


def avoid_dynamo_import() -> None:
    """Keep `torch._dynamo` (and sympy) out of an eager training process: ~1.5-3 CPU-s per process
    start on this box, 85 % of `create_engine`. Three things import it only to mark code as "do not
    trace": (1) torch.optim.Optimizer methods and the functional `adam` are wrapped by
    `torch._disable_dynamo`, which imports dynamo on the first call to learn the "disabled" version of
    the function; we pre-bind that version to the function itself (identical when nothing is being
    compiled: we never compile the optimizer). (2) Optimizer.step's `_use_grad_for_differentiable`
    imports it on every call: `EagerAdamW.step` skips that wrapper. (3) DeepSpeed imports its Muon
    optimizer for isinstance checks (in initialize and ZeRO's gradient path), a module that applies
    torch.compile at import: we import it once with the compile deferred to its first call.
    A process that already imported dynamo (it compiles something) is left alone."""
    if "torch._dynamo" in sys.modules:
        return
    import importlib
    import functools
    adam = importlib.import_module("torch.optim.adam")
    # ZeRO-3's parameter coordinator wraps its per-step methods the same way
    coordinator = importlib.import_module("deepspeed.runtime.zero.partitioned_param_coordinator")
    wrapped = [torch.optim.Optimizer, coordinator.PartitionedParameterCoordinator]
    for fn in [f for cls in wrapped for v in vars(cls).values() for f in _disabled_dynamo_functions(v)] + \
            _disabled_dynamo_functions(adam.adam):
        fn.__dynamo_disable = fn
    if "deepspeed.runtime.zero.muon.muon_optimizer" in sys.modules:
        return
    from deepspeed.runtime import compiler
    original = compiler.compile

    def deferred_compile():
        def decorate(fn):
            compiled = None

            @functools.wraps(fn)
            def call(*args, **kwargs):
                nonlocal compiled
                if compiled is None:
                    compiled = torch.compile(fn)
                return compiled(*args, **kwargs)
            return call
        return decorate

    compiler.compile = deferred_compile
    try:
        importlib.import_module("deepspeed.runtime.zero.muon.muon_optimizer")
    finally:
        compiler.compile = original


@contextlib.contextmanager
def compiler_disable_as_identity():
    """Inside: `torch.compiler.disable(fn)` returns fn. DeepSpeed's ZeRO-3 wraps its per-module hooks
    with it while building the engine, and its first call imports torch._dynamo (1.5 CPU-s, +141 MB
    RSS per rank). "Do not trace this" means nothing to a process that never compiles; a process that
    already imported dynamo is left alone."""
    if "torch._dynamo" in sys.modules:
        yield
        return
    original = torch.compiler.disable

    def identity(fn=None, recursive=True, *, reason=None):
        return fn if fn is not None else (lambda f: f)

    torch.compiler.disable = identity
    try:
        yield
    finally:
        torch.compiler.disable = original


class EagerAdamW(torch.optim.AdamW):
    """torch's AdamW (same update code, same state) whose step skips the graph-break wrapper that
    imports torch._dynamo (see avoid_dynamo_import). Not for use inside torch.compile."""

    @torch.no_grad()
    def step(self, closure=None):
        return torch.optim.AdamW.step.__wrapped__(self, closure)


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    kind = cfg.optimizer
    if kind == "auto":
        kind = "fused" if device.type == "cuda" else "torch"
    # torch's own fused AdamW (CUDA kernels shipped with torch): no JIT build, unlike DeepSpeed's.
    fused = kind == "fused"
    if fused and device.type != "cuda":
        raise ValueError("train.optimizer=fused needs a GPU; use train.optimizer=torch on CPU")
    return EagerAdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def zero_bucket_elements(cfg: TrainConfig, num_params: int | None, world_size: int = 1) -> int:
    """Bucket size for ZeRO collectives: the config's, or min(5e7, params / 8) (at least 2**20).
    Under ZeRO-3 the share is of a rank's partition, params / world_size: there each rank's buffers
    (prefetched and live gathered weights, the gradient reduce bucket) sit beside a partition that
    shrinks with the world size, and params / 8 would be half of it at 4 ranks (measured, `small`,
    4 CPU ranks, benchmarks/train_step.py: peak RSS 1667-1685 MB with params / 8, 1601-1632 MB with
    params / 32). At scale (pi05-3b on 8 ranks: 47M) it stays near DeepSpeed's 5e7 prefetch default."""
    if cfg.zero_bucket_elements:
        return cfg.zero_bucket_elements
    if num_params is None:
        return int(5e7)
    share = num_params // (world_size if cfg.zero_stage == 3 else 1)
    return int(min(5e7, max(2**20, share // 8)))


def ds_config(cfg: TrainConfig, micro_batch: int, world_size: int, load_universal: bool = False,
              num_params: int | None = None) -> dict:
    accum = grad_accum_steps(cfg, micro_batch, world_size)
    bucket = zero_bucket_elements(cfg, num_params, world_size)
    config: dict = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro_batch * accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_allow_untested_optimizer": True,   # torch.optim.AdamW is "untested" to DeepSpeed
        # Buckets of at most 5e7 elements instead of DeepSpeed's 5e8: the latter preallocates ~2 GB
        # (fp32) per bucket, more than a small model's whole state; 5e7 keeps collectives large on GPU.
        "zero_optimization": {"stage": cfg.zero_stage, "reduce_bucket_size": bucket,
                              "allgather_bucket_size": bucket},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "steps_per_print": 10**9,                # we log ourselves
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if cfg.zero_stage == 3:
        # Export consolidates from the fp32 shards (zero_to_fp32), so no 16-bit gather at save time.
        # Live gathered parameters bounded by the bucket too: DeepSpeed's default (1e9 elements) keeps
        # every gathered layer alive between forward and backward -- for a model under 1e9 parameters
        # that is the whole model on every rank at the step's peak, the memory ZeRO-3 is meant to save.
        # Optimizer sub-groups of at most 1/8 of the model (DeepSpeed's default, 1e9 elements, is one
        # group for any model below 1e9 parameters): DeepSpeed sizes a temporary gradient buffer at
        # engine build by the largest sub-group's FULL element count (a whole fp32 model on every
        # rank, 432 MB for `small`, 12 GB for pi05-3b), and flattens each sub-group's gradient
        # partition once more at every step.
        if num_params:
            config["zero_optimization"]["sub_group_size"] = int(min(1e9, max(2**20, num_params // 8)))
        config["zero_optimization"].update(stage3_gather_16bit_weights_on_model_save=False,
                                           stage3_prefetch_bucket_size=bucket,
                                           stage3_max_live_parameters=bucket,
                                           stage3_max_reuse_distance=bucket)
        config["zero_optimization"].pop("allgather_bucket_size")
    return config


def build_partitioned(model_factory, cfg, micro_batch: int, world_size: int) -> nn.Module:
    """Build the model under DeepSpeed's zero.Init (ZeRO-3): each module's parameters are partitioned
    across ranks as soon as the module exists, so no rank ever holds the whole model (peak memory
    follows the partition, not the model). Weight init that the model applies after construction
    (VLA.init_module_weights) is re-applied one module at a time with that module's parameters
    gathered (rank 0's values are kept), so the weights equal an unpartitioned build's."""
    import deepspeed

    from megavla.model.vla import deferred_weight_init
    config = ds_config(cfg.train, micro_batch, world_size)
    avoid_dynamo_import()
    with compiler_disable_as_identity(), deferred_weight_init(), deepspeed.zero.Init(config_dict_or_path=config):
        model = model_factory(cfg)
    init = getattr(model, "init_module_weights", None)
    if init is not None:
        for module in model.modules():
            params = list(module.parameters(recurse=False))
            if params:
                with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                    init(module)
    return model


def create_engine(model: nn.Module, cfg: TrainConfig, micro_batch: int, dist: DistInfo,
                  load_universal: bool = False):
    """Returns (engine, optimizer, scheduler)."""
    import deepspeed
    avoid_dynamo_import()
    model.to(dist.device)
    optimizer = build_optimizer(model, cfg, dist.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    # ds_numel: a parameter partitioned by zero.Init has numel() 0 (its data lives in ds_tensor).
    num_params = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
    config = ds_config(cfg, micro_batch, dist.world_size, load_universal, num_params)
    with compiler_disable_as_identity():
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    log.info("DeepSpeed engine: ZeRO-%d, %s, micro batch %d x accum %d x world %d", cfg.zero_stage,
             cfg.precision, micro_batch, config["gradient_accumulation_steps"], dist.world_size)
    # frozen parameters (train.freeze, train.lora) are in no optimizer group: no state, no update
    from megavla.model.lora import optimizer_state_bytes
    trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters() if p.requires_grad)
    log.info("optimizer: %.2fM of %.2fM parameters trainable, AdamW state %.1f MB for the model%s",
             trainable / 1e6, num_params / 1e6, optimizer_state_bytes(trainable, cfg.precision) / 1e6,
             f" ({dist.world_size} ZeRO-{cfg.zero_stage} partitions)" if cfg.zero_stage and dist.world_size > 1 else "")
    return engine, optimizer, scheduler


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
