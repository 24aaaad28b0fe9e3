"""The pi0.5-style VLA: SigLIP tower + Gemma backbone + action expert, trained on three objectives.

Module tree (parameter names; HF PaliGemma names in brackets for the weight loader)::

    VLA
    ├── vision: VisionTower                          [vision_tower.vision_model]
    │   ├── patch_embed: Conv2d(3, Wv, p, stride p)   [embeddings.patch_embedding]
    │   ├── pos_embed: Parameter [N, Wv]              [embeddings.position_embedding.weight]
    │   ├── layers.{i}: layer_norm1, self_attn.{q,k,v,out}_proj (bias), layer_norm2, mlp.fc1/fc2
    │   │                                             [encoder.layers.{i}.<same names>]
    │   └── post_layernorm                            [post_layernorm]
    ├── projector: Linear(Wv, W)                      [multi_modal_projector.linear]
    ├── embed_tokens: Embedding(text + FAST + 3, W)   [language_model.embed_tokens]; tied output head
    ├── backbone: GemmaStack                          [language_model]
    │   ├── layers.{i}: input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
    │   │               mlp.{gate,up,down}_proj        [layers.{i}.<same names>]
    │   └── norm                                      [norm]
    ├── state_embed: Embedding(state_bins, W)         (state_mode=discrete)
    └── expert: ActionExpert
        ├── stack: GemmaStack (width We, same depth/heads/head_dim; norms are AdaRMSNorm.dense with
        │          time_conditioning=adarms)
        ├── action_in_proj, action_out_proj, time_mlp_in/out (adarms) | action_time_mlp_in/out (mlp)
        └── state_proj (state_mode=continuous)

Vocabulary rows of ``embed_tokens``: [0, text_vocab) text, [text_vocab, text_vocab + fast_vocab)
FAST (batch FAST ids are FAST-local; the model adds ``fast_offset``), FAST_END (FAST-local id
``fast_vocab``: ends every FAST target, like openpi's "|" + EOS, so greedy FAST decoding stops by
itself), then the SUBTASK_START and FAST_START markers that open the two LM-suffix segments.

Sequence (kinds of megavla.kernels.AttentionLayout)::

    PREFIX        [camera tokens (absent cameras invalid) | text | state tokens (discrete)]  bidirectional
    SUBTASK       [SUBTASK_START, subtask...]       causal; action rows read it (action_conditioning=subtask;
                                                    with =instruction these tokens are LM_SUFFIX)
    LM_SUFFIX     [FAST_START, fast..., FAST_END]   causal; action rows never read it
    EXPERT_STATE  [state token] (continuous state, pi0)  its own block: blind to the action tokens
    EXPERT        [action tokens x_t]               bidirectional; sees everything above but LM_SUFFIX

RoPE positions count valid tokens; expert positions continue right after what the action rows read
(prefix, + subtask segment when conditioned on it), exactly as at inference, where the FAST
segment does not exist. Images enter unscaled, text/state embeddings x sqrt(W) (= HF PaliGemma,
which divides image features by sqrt(W) before Gemma's x sqrt(W)).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import nn

from megavla.batch import Batch
from megavla.config.model import ModelConfig
from megavla.kernels import EXPERT, EXPERT_STATE, LM_SUFFIX, PREFIX, SUBTASK, AttentionLayout

from . import inference, losses
from .expert import ActionExpert
from .gemma import GemmaStack, SharedAttention, Stream, TiedEmbedding, run_shared_layers
from .presets import resolve
from .tokens import Tokens
from .vision import VisionTower, encode_cameras

logger = logging.getLogger(__name__)


@dataclass
class Outputs:
    """What one training-path pass computes (None for objectives that are off)."""
    backbone_hidden: torch.Tensor | None = None   # [B, L, W] before the final norm
    velocity: torch.Tensor | None = None          # expert output [B, H, A] fp32
    actions: torch.Tensor | None = None           # cleaned targets (unsupervised entries 0)
    noise: torch.Tensor | None = None
    subtask_logits: torch.Tensor | None = None    # [B, Ls, vocab]; position j predicts subtask token j
    fast_logits: torch.Tensor | None = None       # [B, Lf, vocab]; position j predicts FAST token j


class VLA(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg = resolve(cfg)
        self.cfg = cfg
        impl = cfg.kernels
        self.vision = VisionTower(cfg.image_size, cfg.patch_size, cfg.vision_width, cfg.vision_depth,
                                  cfg.vision_heads, cfg.vision_mlp_dim)
        self.projector = nn.Linear(cfg.vision_width, cfg.width)
        if cfg.subtask_eos_id >= cfg.text_vocab_size:
            raise ValueError(f"model.subtask_eos_id={cfg.subtask_eos_id} is outside the text vocabulary "
                             f"[0, {cfg.text_vocab_size}); set it to the text tokenizer's eos_id")
        self.fast_offset = cfg.text_vocab_size
        self.fast_end_local = cfg.fast_vocab_size          # FAST-local id of FAST_END
        self.fast_end_id = self.fast_offset + self.fast_end_local
        self.subtask_start_id = self.fast_end_id + 1
        self.fast_start_id = self.subtask_start_id + 1
        self.vocab_size = self.fast_start_id + 1
        # the kind of the subtask segment: SUBTASK is read by the action rows, LM_SUFFIX is not
        self.subtask_kind = SUBTASK if cfg.action_conditioning == "subtask" else LM_SUFFIX
        self.embed_tokens = TiedEmbedding(self.vocab_size, cfg.width)
        self.backbone = GemmaStack(cfg.width, cfg.depth, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads,
                                   cfg.head_dim, impl=impl)
        self.state_embed = nn.Embedding(cfg.state_bins, cfg.width) if cfg.state_mode == "discrete" else None
        self.expert = ActionExpert(cfg.expert_width, cfg.depth, cfg.expert_mlp_dim, cfg.num_heads,
                                   cfg.num_kv_heads, cfg.head_dim, cfg.action_dim, cfg.state_dim,
                                   cfg.time_conditioning, cfg.state_mode == "continuous", impl)
        self.vision.checkpoint_layers = cfg.activation_checkpointing
        if not _DEFERRED_INIT:
            self.apply(_init_weights)
        # Optimizer steps taken so far; the trainer sets it (knowledge insulation "on after N").
        self.training_step = 0

    @property
    def insulated(self) -> bool:
        """Whether the flow loss is kept out of the backbone at the current training step."""
        cfg = self.cfg
        return cfg.knowledge_insulation and self.training_step >= cfg.knowledge_insulation_start_step

    @staticmethod
    def init_module_weights(module: nn.Module) -> None:
        """The weight init `__init__` applies to every module, for callers that build the model with
        partitioned parameters (DeepSpeed zero.Init) and re-apply it one gathered module at a time."""
        _init_weights(module)

    @property
    def tokens_per_image(self) -> int:
        """Backbone tokens one present camera image contributes (for tokens/s accounting)."""
        return self.vision.num_patches

    # ------------------------------------------------------------------ token assembly
    def _embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        return x * torch.tensor(self.cfg.width ** 0.5, dtype=x.dtype)

    def prefix_tokens(self, batch: Batch) -> Tokens:
        """Camera + text (+ discrete state) tokens with positions counting valid tokens only."""
        img, img_valid = encode_cameras(self.vision, self.projector, batch.images, batch.image_mask)
        # padded ids may be anything (the mask says so): embed a safe id there
        text_ids = torch.where(batch.text_mask, batch.text_tokens, torch.zeros_like(batch.text_tokens))
        parts_x = [img, self._embed_ids(text_ids)]
        parts_valid = [img_valid, batch.text_mask]
        if self.state_embed is not None:
            bins = self.cfg.state_bins
            idx = ((batch.state.clamp(-1.0, 1.0) + 1.0) * 0.5 * bins).floor().long().clamp(0, bins - 1)
            state_x = self.state_embed(idx)
            parts_x.append(state_x * torch.tensor(self.cfg.width ** 0.5, dtype=state_x.dtype))
            parts_valid.append(batch.state_mask)
        x = torch.cat([p.to(self.embed_tokens.weight.dtype) for p in parts_x], dim=1)
        valid = torch.cat(parts_valid, dim=1)
        positions = (torch.cumsum(valid.long(), dim=1) - 1).clamp_min(0)
        return Tokens(x, valid, torch.full_like(positions, PREFIX), positions)

    @property
    def actions_read_subtask(self) -> bool:
        """The action rows attend to the subtask segment (action_conditioning=subtask, flow on)."""
        return self.cfg.action_conditioning == "subtask" and self.cfg.flow_weight > 0

    @property
    def subtask_in_sequence(self) -> bool:
        """Training puts the subtask segment in the sequence: as a target and/or as action context."""
        return self.cfg.subtask_weight > 0 or self.actions_read_subtask

    def fast_targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """FAST tokens in model ids with FAST_END after each row's last valid token -> ([B, Lf+1] ids,
        [B, Lf+1] mask). Padding stays padding (invalid)."""
        b, length = batch.fast_tokens.shape
        ends = batch.fast_mask.long().sum(dim=1, keepdim=True)  # right-padded: first free slot
        col = torch.arange(length + 1, device=ends.device)[None, :]
        ids = torch.cat([batch.fast_tokens + self.fast_offset,
                         batch.fast_tokens.new_zeros(b, 1)], dim=1)
        ids = torch.where(col == ends, torch.full_like(ids, self.fast_end_id), ids)
        return ids, torch.cat([batch.fast_mask, batch.fast_mask.new_zeros(b, 1)], dim=1) | (col == ends)

    def lm_suffix_tokens(self, batch: Batch, prefix: Tokens, with_subtask: bool, with_fast: bool,
                         fast_end: bool = True):
        """[SUBTASK_START, subtask...] (kind ``subtask_kind``) + [FAST_START, fast..., FAST_END]
        (LM_SUFFIX) -> (Tokens, {"subtask": start, "fast": start}). ``fast_end=False``: no FAST_END
        (the seed of greedy FAST decoding)."""
        b, dev = batch.batch_size, batch.text_tokens.device
        ids, valid, kinds, starts, length = [], [], [], {}, 0
        one = torch.ones(b, 1, dtype=torch.bool, device=dev)
        if with_subtask:
            starts["subtask"] = length
            ids += [torch.full((b, 1), self.subtask_start_id, device=dev), batch.subtask_tokens]
            valid += [one, batch.subtask_mask]
            length += 1 + batch.subtask_tokens.shape[1]
            kinds.append(torch.full((b, length), self.subtask_kind, device=dev))
        if with_fast:
            starts["fast"] = length
            fast_ids, fast_mask = (self.fast_targets(batch) if fast_end
                                   else (batch.fast_tokens + self.fast_offset, batch.fast_mask))
            ids += [torch.full((b, 1), self.fast_start_id, device=dev), fast_ids]
            valid += [one, fast_mask]
            kinds.append(torch.full((b, 1 + fast_ids.shape[1]), LM_SUFFIX, device=dev))
        ids_t, valid_t = torch.cat(ids, dim=1), torch.cat(valid, dim=1)
        # padded ids may be anything; embed a safe id there (the token is invalid anyway)
        ids_t = torch.where(valid_t, ids_t, torch.zeros_like(ids_t))
        positions = prefix_length(prefix)[:, None] + (torch.cumsum(valid_t.long(), dim=1) - 1).clamp_min(0)
        kind = torch.cat(kinds, dim=1).to(prefix.kind.dtype)
        return Tokens(self._embed_ids(ids_t), valid_t, kind, positions), starts

    def expert_tokens(self, x_t: torch.Tensor, t: torch.Tensor, batch: Batch, start: torch.Tensor):
        """Expert stream + its kind/valid; positions continue from ``start`` [B] (the first position
        after what the action rows read). A continuous state token is its own EXPERT_STATE block."""
        state = torch.where(batch.state_mask, batch.state, torch.zeros_like(batch.state))  # NaN-safe
        x, cond = self.expert.embed(x_t, t, state)
        b, length = x.shape[:2]
        positions = start[:, None] + torch.arange(length, device=x.device)[None, :]
        kind = torch.full((b, length), EXPERT, dtype=torch.long, device=x.device)
        kind[:, :self.expert.num_state_tokens] = EXPERT_STATE
        valid = torch.ones(b, length, dtype=torch.bool, device=x.device)
        return Stream(x, positions, cond), kind, valid

    def shared_attention(self, bb_layout, ex_layout, cache=None) -> SharedAttention:
        return SharedAttention(bb_layout, ex_layout, cache, self.insulated,
                               self.cfg.rope_theta, self.cfg.kernels, self.cfg.attention)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Backbone hidden (before the final norm) -> logits over the whole vocabulary (tied head)."""
        normed, _ = self.backbone.norm(hidden)
        return self.embed_tokens(normed, as_head=True)

    # ------------------------------------------------------------------ training
    def run(self, batch: Batch, noise: torch.Tensor | None = None,
            time: torch.Tensor | None = None) -> Outputs:
        """The training-path computation (objectives with weight 0 are left out of the sequence)."""
        losses.check_batch(self, batch)
        return self.run_checked(batch, noise, time)

    def run_checked(self, batch: Batch, noise: torch.Tensor | None = None,
                    time: torch.Tensor | None = None) -> Outputs:
        """`run` after `losses.check_batch` (host reads of the token ids: outside a compiled graph)."""
        cfg = self.cfg
        use_flow, use_fast = cfg.flow_weight > 0, cfg.fast_weight > 0
        with_subtask = self.subtask_in_sequence
        prefix = self.prefix_tokens(batch)
        parts, starts = [prefix], {}
        if use_fast or with_subtask:
            suffix, starts = self.lm_suffix_tokens(batch, prefix, with_subtask, use_fast)
            parts.append(suffix)
        bb = Tokens.cat(parts)
        bb_layout = AttentionLayout.from_kinds(bb.kind, bb.valid)
        out = Outputs()
        ex = ex_layout = None
        if use_flow:
            out.actions = losses.clean_actions(batch)
            t, out.noise, x_t = losses.noisy_actions(out.actions, noise, time, cfg.kernels)
            start = prefix_length(prefix)
            if self.actions_read_subtask:  # + SUBTASK_START + the valid subtask tokens
                start = start + 1 + batch.subtask_mask.long().sum(dim=1)
            ex, ex_kind, ex_valid = self.expert_tokens(x_t, t, batch, start)
            ex_layout = AttentionLayout.from_kinds(torch.cat([bb.kind, ex_kind.to(bb.kind.dtype)], 1),
                                                   torch.cat([bb.valid, ex_valid], 1), ex.x.shape[1])
        bb_h, ex_h, _ = run_shared_layers(self.backbone, self.expert.stack if use_flow else None,
                                          Stream(bb.x, bb.positions), ex, self.shared_attention(bb_layout, ex_layout),
                                          checkpoint=cfg.activation_checkpointing and self.training)
        out.backbone_hidden = bb_h
        if use_flow:
            out.velocity = self.expert.velocity(ex_h, ex.cond, cfg.chunk_length)
        # logits only for the objectives that are on (a subtask segment may be context only)
        targets = {"subtask": (cfg.subtask_weight > 0, batch.subtask_tokens.shape[1]),
                   "fast": (use_fast, batch.fast_tokens.shape[1] + 1)}  # + FAST_END
        for name, (on, length) in targets.items():
            if on:
                begin = prefix.x.shape[1] + starts[name]  # hidden at the start marker predicts token 0
                setattr(out, f"{name}_logits", self.logits(bb_h[:, begin:begin + length]))
        return out

    def forward(self, batch: Batch, noise: torch.Tensor | None = None,
                time: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Weighted loss of the objectives with weight > 0 (others are not computed) + detached
        per-objective and per-embodiment values ("flow/<embodiment id>", ...) for logging."""
        losses.check_batch(self, batch)
        if self.cfg.flow_weight > 0:
            # Drawn here, outside what train.compile=full compiles: inductor's random ops draw other
            # numbers than eager's from the same seed. Same order and shapes as noisy_actions.
            a = batch.actions
            time = losses.sample_time(a.shape[0], a.device) if time is None else time
            noise = torch.randn_like(a) if noise is None else noise
        return self.compute_losses(batch, noise, time)

    def compute_losses(self, batch: Batch, noise: torch.Tensor | None = None,
                       time: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`forward` after the batch check: what `train.compile=full` compiles (one graph)."""
        cfg = self.cfg
        res = self.run_checked(batch, noise, time)
        out: dict[str, torch.Tensor] = {}
        total = res.backbone_hidden.new_zeros((), dtype=torch.float32)
        if res.velocity is not None:
            flow, per_sample = losses.flow_loss(res.velocity, res.actions, res.noise, batch, cfg.kernels)
            total = total + cfg.flow_weight * flow
            losses.log_per_embodiment(out, "flow", flow, per_sample, losses.flow_supervised(batch), batch)
        fast_ids, fast_mask = self.fast_targets(batch)
        for name, logits, targets, mask, weight in (
                ("subtask", res.subtask_logits, batch.subtask_tokens, batch.subtask_mask, cfg.subtask_weight),
                ("fast", res.fast_logits, fast_ids, fast_mask, cfg.fast_weight)):
            if logits is None:
                continue
            ce, per_sample_sum, per_sample_count = losses.token_ce(logits, targets, mask)
            total = total + weight * ce
            losses.log_per_embodiment(out, name, ce, per_sample_sum, per_sample_count, batch, summed=True)
        out["loss"] = total
        return out

    # ------------------------------------------------------------------ inference / probes
    @torch.no_grad()
    def sample_actions(self, batch: Batch, num_steps: int = 10, noise: torch.Tensor | None = None,
                       use_cache: bool = True, subtask: tuple[torch.Tensor, torch.Tensor] | None = None,
                       return_subtask: bool = False):
        """Euler-integrate the expert's velocity from t=1 (noise) to t=0 -> actions [B, H, A] fp32.
        With action_conditioning=subtask the subtask is decoded first (greedy, up to
        model.subtask_len tokens or model.subtask_eos_id), unless ``subtask`` = (ids, mask) is given.
        ``return_subtask``: -> (actions, (text ids [B, n], valid [B, n]) the actions were conditioned
        on, None with action_conditioning=instruction), so callers need not decode it twice."""
        return inference.sample_actions(self, batch, num_steps, noise, use_cache, subtask, return_subtask)

    @torch.no_grad()
    def predict_subtask(self, batch: Batch, max_len: int = 16, eos_id: int | None = None,
                        use_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy next-subtask text -> (token ids [B, max_len], valid mask [B, max_len])."""
        return inference.greedy_decode(self, batch, "subtask", max_len, eos_id, use_cache)

    @torch.no_grad()
    def predict_fast(self, batch: Batch, max_len: int = 64, use_cache: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy FAST tokens (FAST-local ids) after the batch's subtask tokens, stopping at FAST_END
        (``fast_end_local``; valid in the mask, the tokens after it are not) -> (ids, mask)."""
        return inference.greedy_decode(self, batch, "fast", max_len, self.fast_end_local, use_cache)

    def decode_fast(self, tokens, fast_tokenizer, horizon: int | None = None, dim: int | None = None):
        """FAST-local token ids (list or 1-D tensor; FAST_END and what follows are dropped) -> action
        chunk [H, dim] via the FAST tokenizer."""
        return inference.decode_fast(self, tokens, fast_tokenizer, horizon, dim)

    @torch.no_grad()
    def embed_prefix(self, batch: Batch) -> torch.Tensor:
        """Mean over valid prefix tokens of the backbone's final (normed) hidden states -> [B, W] fp32."""
        return inference.embed_prefix(self, batch)


def prefix_length(prefix: Tokens) -> torch.Tensor:
    """Valid prefix tokens per sample [B]: the first position after the prefix."""
    return prefix.valid.long().sum(dim=1)


_DEFERRED_INIT = False


@contextlib.contextmanager
def deferred_weight_init():
    """VLAs built inside skip the final weight init: the caller applies `VLA.init_module_weights` to
    each module itself (in module order, so the weights equal a plain build's), e.g. with the
    module's partitioned parameters gathered (DeepSpeed zero.Init)."""
    global _DEFERRED_INIT
    previous, _DEFERRED_INIT = _DEFERRED_INIT, True
    try:
        yield
    finally:
        _DEFERRED_INIT = previous


def _init_weights(module: nn.Module) -> None:
    if getattr(module, "_zero_init", False):   # adaLN-zero layers (gemma.AdaRMSNorm.dense)
        nn.init.zeros_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.Linear, nn.Embedding)) and not getattr(module, "_keep_init", False):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


def build_model(cfg: ModelConfig) -> VLA:
    """The model for a (possibly partial) ModelConfig; sizes missing from cfg come from its preset."""
    model = VLA(cfg)
    logger.info("built VLA preset=%s: %.1fM parameters", model.cfg.preset,
                sum(p.numel() for p in model.parameters()) / 1e6)
    return model
