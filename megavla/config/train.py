"""Trainer settings (owned by megavla/train).

Defaults follow openpi's pi0.5 recipe where it states one: AdamW with betas (0.9, 0.95), gradient
clipping at 1.0, 1k linear warmup steps, then cosine decay (openpi decays 2.5e-5 -> 2.5e-6, i.e. to
0.1 x peak). Weight decay applies only to matrices (ndim >= 2); biases, norms and other vectors get
none. Precision defaults to bf16 (DeepSpeed mixed precision with fp32 master weights); use fp32 for
bit-exactness tests and on CPUs without fast bf16.

Batch size: `data.batch_size` is the micro batch per rank. The global batch per optimizer step is
`data.batch_size x grad_accum x world_size`, unless `global_batch_size` is set, in which case
`grad_accum` is derived from it for the current world size (so a resume at another world size
keeps the optimization identical).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .core import ConfigError

LoraPart = Literal["backbone", "expert", "vision"]
LoraTarget = Literal["attention", "mlp"]


@dataclass
class LoraConfig:
    """LoRA finetune (megavla/model/lora.py): rank-r adapters on the chosen layers; with it on, only
    the adapters and `train.trainable_parts` train (everything else is frozen: no gradient, no
    optimizer state). rank 0 or null = off (full finetune)."""
    rank: int | None = 0
    alpha: float | None = None            # update scale alpha / rank; null = rank (scale 1, as openpi)
    dropout: float = 0.0                  # on the adapter's input only
    targets: list[LoraTarget] = field(default_factory=lambda: ["attention", "mlp"])
    parts: list[LoraPart] = field(default_factory=lambda: ["backbone", "expert"])

    @property
    def enabled(self) -> bool:
        return bool(self.rank)

    @property
    def alpha_value(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def validate(self) -> None:
        if self.rank is not None and self.rank < 0:
            raise ConfigError(f"rank={self.rank} must be >= 0 (0 or null = LoRA off; e.g. train.lora.rank=16)")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"alpha={self.alpha} must be > 0 or null (= rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        if self.enabled and (not self.targets or not self.parts):
            raise ConfigError("targets and parts must each name at least one entry when rank > 0 "
                              "(targets: attention, mlp; parts: backbone, expert, vision)")


@dataclass
class TrainConfig:
    # This run's own directory (checkpoints, metrics, tensorboard, logs). No default: a shared default
    # (it was `runs/demo` in configs/demo.yaml, which is also `megavla demo`'s output) let two runs or
    # two commands write into one directory. `megavla train` / `launch` refuse to start without it.
    run_dir: str | None = None
    # Directory written by `megavla tokenizer train` (text.model, fast.model/.json); copied into
    # every checkpoint. Empty = the data pipeline runs without tokenizers (no text / FAST tokens).
    tokenizer_dir: str = ""
    steps: int = 1000                     # optimizer steps in total (a resume continues to this)
    seed: int = 0
    zero_stage: int = 2                   # DeepSpeed ZeRO stage 0, 1, 2 or 3
    precision: Literal["bf16", "fp32"] = "bf16"
    # ZeRO communication bucket, in elements (reduce / allgather / ZeRO-3 prefetch). 0 = auto:
    # min(5e7, params / 8), at least 2**20 (ZeRO-3: params / world_size / 8, an eighth of a rank's
    # partition) -- a fixed 5e7 bucket (190 MiB in fp32) outweighs a small model's whole sharded state
    # and hides ZeRO-3's saving.
    zero_bucket_elements: int = 0
    # ZeRO-3: build the model under deepspeed.zero.Init, so each rank only ever holds its partition
    # (false: every rank builds the whole fp32 model first, then DeepSpeed partitions it).
    zero3_init: bool = True
    # Host heap: allocations of at least this many KiB get their own mapping, returned to the OS when
    # freed (glibc mallopt M_MMAP_THRESHOLD, fixed at process start). 0 = the default policy: 128 while
    # the model, weights, engine and checkpoint are built/loaded, then for the steps 1024 under ZeRO-3
    # (under glibc's dynamic threshold freed layer-sized tensors fragment the heap and, on CPU, ZeRO-3's
    # step peak sat above ZeRO-2's) and 32768 otherwise (at 1024 page faults cost a CPU ZeRO-2 step
    # 12-38 % at 2 ranks). megavla/train/host_memory.py has the measurements. At most 32768 (glibc's limit).
    malloc_mmap_threshold_kb: int = 0
    # A checkpoint a fresh run starts from (a resume starts from its own checkpoint): a PaliGemma
    # directory of *.safetensors or one file (vision tower + backbone), or a LeRobot / openpi pi0 /
    # pi0.5 policy directory (every tensor, action expert included); read one tensor at a time
    # (model.pretrained.load_pretrained); under ZeRO-3 each is gathered, written and re-partitioned in
    # turn, so no rank ever holds the whole model. The model's sizes must match the checkpoint's
    # (paligemma_size_overrides / pretrained_pi0.pi0_size_overrides; a mismatch error prints the
    # model.* overrides); pretrained_strict=false loads what fits and logs the rest.
    pretrained: str = ""
    pretrained_strict: bool = True
    # Warm start from a MegaVLA run (a finetune): a run dir (its newest loadable checkpoint), one
    # checkpoint dir (step_NNNNNN) or an export dir; the model is built, these weights are loaded
    # strictly (the EMA when the checkpoint kept one, as evaluation loads), and the run trains from
    # step 0 with its own optimizer and schedule (megavla/train/warm_start.py). A resume loads the
    # run's own checkpoint instead. Empty = no warm start.
    init_from: str = ""
    grad_accum: int = 1
    global_batch_size: int | None = None  # if set, grad_accum = global / (micro x world)
    # Optimizer and schedule (openpi pi0.5 defaults).
    lr: float = 2.5e-5
    min_lr_ratio: float = 0.1             # cosine decays to lr x min_lr_ratio
    warmup_steps: int = 1000
    decay_steps: int | None = None        # cosine length after warmup; None = steps - warmup
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 1e-10
    grad_clip: float = 1.0
    optimizer: Literal["auto", "torch", "fused"] = "auto"   # auto = fused (torch's fused AdamW, GPU or CPU)
    # Memory / model options.
    # (activation checkpointing per layer is model.activation_checkpointing; objectives are the
    #  model's loss weights: model.subtask_weight/fast_weight = high level, model.flow_weight = low level)
    freeze: list[str] = field(default_factory=list)  # parameter-name prefixes, e.g. ["vision"]
    # LoRA adapters (train.lora.rank=16 turns them on); applied after `pretrained` is loaded.
    lora: LoraConfig = field(default_factory=LoraConfig)
    # With LoRA on: parameter-name prefixes that train in full beside the adapters, e.g. ["expert"]
    # after a PaliGemma start (its action expert is new); `freeze` still wins over it.
    trainable_parts: list[str] = field(default_factory=list)
    # e.g. 0.999: fp32 EMA of the engine's module weights (bf16 copies under bf16 precision),
    # updated every optimizer step, saved as ema.safetensors; needs ZeRO stage <= 2.
    ema_decay: float | None = None
    # Logging, validation, checkpoints.
    log_every: int = 10
    val_every: int = 0                    # 0 = no validation (needs data.val_sources)
    val_batches: int = 4
    # Validation samples whose predicted vs true action chunks go to tensorboard as one image per
    # validation (val/action_chunks; megavla/train/val_figures.py); 0 = off.
    val_action_figures: int = 2
    save_every: int = 500                 # also saved at the end and on SIGTERM / SIGUSR2
    keep_last: int = 3
    tensorboard: bool = True
    progress: bool = True                 # tqdm line on rank 0
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"
    # Stop after this many steps of *this* invocation (0 = run to `steps`); used to split a run
    # into segments (the demo's train -> resume) without changing the schedule.
    max_steps_per_run: int = 0
    # A step whose loss or gradient norm is inf/NaN is skipped (no update) and counted in
    # train/skipped_nonfinite; this many in a row stop the run with an error.
    max_nonfinite_steps: int = 10
    # torch.compile of the model (megavla/model/compile.py): none; blocks = each transformer block
    # compiled in place (torchtitan's way; checkpoints unchanged); full = the whole forward (not with
    # ZeRO-3). The first step compiles (tiny, CPU: ~50 s cold, ~5 s from inductor's on-disk cache).
    compile: Literal["none", "blocks", "full"] = "none"

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0 (e.g. train.lr=2.5e-5; YAML reads 2.5e-5 as a number only with the dot)")
        if self.zero_bucket_elements < 0:
            raise ConfigError(f"zero_bucket_elements={self.zero_bucket_elements} must be >= 0 (0 = auto)")
        if not 0 <= self.malloc_mmap_threshold_kb <= 32768:
            raise ConfigError(f"malloc_mmap_threshold_kb={self.malloc_mmap_threshold_kb} must be in [0, 32768] "
                              "(KiB; 0 = glibc's default dynamic threshold)")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage={self.zero_stage} is not a ZeRO stage; choose 0, 1, 2 or 3")
        for name in ("steps", "grad_accum", "log_every", "keep_last", "val_batches", "max_nonfinite_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("warmup_steps", "save_every", "val_every", "max_steps_per_run", "val_action_figures"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if self.global_batch_size is not None and self.global_batch_size <= 0:
            raise ConfigError(f"global_batch_size={self.global_batch_size} must be > 0 or null")
        if self.decay_steps is not None and self.decay_steps <= 0:
            raise ConfigError(f"decay_steps={self.decay_steps} must be > 0 or null")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas={list(self.betas)} must be two numbers in [0, 1)")
        if self.weight_decay < 0 or self.eps <= 0 or self.grad_clip < 0:
            raise ConfigError("weight_decay and grad_clip must be >= 0 and eps > 0")
        if self.compile == "full" and self.zero_stage == 3:
            raise ConfigError("compile=full cannot run under zero_stage=3 (ZeRO-3 gathers each layer's parameters "
                              "in hooks inside the forward, which one whole-model graph cannot hold): use "
                              "train.compile=blocks with ZeRO-3, or train.zero_stage<=2 with compile=full")
        if self.ema_decay is not None:
            if not 0.0 < self.ema_decay < 1.0:
                raise ConfigError(f"ema_decay={self.ema_decay} must be in (0, 1) or null")
            if self.zero_stage == 3:
                raise ConfigError("ema_decay needs full parameters on each rank: use zero_stage <= 2")
        if self.init_from and self.pretrained:
            raise ConfigError(f"init_from={self.init_from!r} and pretrained={self.pretrained!r} both set the "
                              "initial weights; keep one of them")
        if self.init_from and self.zero_stage == 3 and self.zero3_init:
            raise ConfigError("init_from loads whole tensors into the built model, which zero3_init partitions "
                              "at build time; set train.zero3_init=false (or zero_stage <= 2) for a warm start")
        if self.trainable_parts and not self.lora.enabled:
            raise ConfigError(f"trainable_parts={self.trainable_parts} applies only with LoRA on: without "
                              "it every parameter trains (but train.freeze); set train.lora.rank or drop it")
        if self.run_dir is not None and not self.run_dir:
            raise ConfigError("run_dir must be a directory path (e.g. train.run_dir=runs/exp1)")

    def check_initial_weights(self) -> None:
        """The initial weights a run about to start reads exist (train.pretrained, train.init_from).
        Checked at launch (train/preflight.py), not when a config is built: a finetuned checkpoint's saved
        config names them too, and it must still load for evaluation or export after they move."""
        if self.pretrained and not Path(self.pretrained).exists():
            raise ConfigError(f"train.pretrained={self.pretrained!r}: no such file or directory (a PaliGemma "
                              "checkpoint: a directory of *.safetensors or one file, or a LeRobot / openpi "
                              "pi0 / pi0.5 policy directory; empty = random init)")
        if not self.init_from:
            return
        path = Path(self.init_from)
        what = ("a MegaVLA run dir, a checkpoint dir (run/checkpoints/step_NNNNNN) or an export dir "
                "(`megavla export`); empty = no warm start")
        if not path.is_dir():
            raise ConfigError(f"train.init_from={self.init_from!r}: no such directory; give {what}")
        markers = ("checkpoints", "trainer_state.json", "model.safetensors", "mp_rank_00_model_states.pt")
        if not any((path / m).exists() for m in markers):
            raise ConfigError(f"train.init_from={self.init_from!r} holds none of {list(markers)}: it is not {what}")

    def require_run_dir(self) -> Path:
        """The run dir of a run about to start; a ConfigError naming the key and the fix when unset."""
        if not self.run_dir:
            raise ConfigError("train.run_dir is not set: give this run its own directory, e.g. "
                              "train.run_dir=runs/mine (checkpoints, metrics and logs go there)")
        return Path(self.run_dir)
