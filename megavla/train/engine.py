"""DeepSpeed engine from our TrainConfig: process group, ZeRO config, engine build.

The optimizer and LR schedule it wraps are in optim.py; the patches of DeepSpeed / torch internals
it applies are in deepspeed_patches.py."""
from __future__ import annotations

import logging
import os
import socket
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from megavla.config.train import TrainConfig

from .deepspeed_patches import (avoid_dynamo_import, compiler_disable_as_identity, skip_deepspeed_triton_import,
                                skip_shm_comm_build)
from .optim import build_optimizer, build_scheduler

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
        skip_deepspeed_triton_import()
        skip_shm_comm_build()
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
    scheduler = build_scheduler(optimizer, cfg)
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
