"""megavla.kernels: the ops every model layer goes through, each a Triton kernel beside its torch
reference, picked by ``impl="auto" | "triton" | "torch"`` (see kernels/dispatch.py)."""
from .attention import (ATTENTION_IMPLS, EXPERT, EXPERT_STATE, LM_SUFFIX, PREFIX, SUBTASK, AttentionLayout,
                        attention, choose_attention_impl)
from .dispatch import IMPLS, resolve_impl, triton_available
from .flow_matching import flow_matching_loss, flow_noise, mean_over_supervised_samples
from .geglu import geglu
from .rmsnorm import ada_rms_norm, rms_norm
from .rope import apply_rope

__all__ = [
    "ATTENTION_IMPLS", "EXPERT", "EXPERT_STATE", "IMPLS", "LM_SUFFIX", "PREFIX", "SUBTASK", "AttentionLayout",
    "ada_rms_norm",
    "apply_rope", "attention", "choose_attention_impl", "flow_matching_loss", "flow_noise", "geglu",
    "mean_over_supervised_samples", "resolve_impl", "rms_norm", "triton_available",
]
