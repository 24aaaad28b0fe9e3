"""megavla.model: the pi0.5-style VLA (see vla.py for the module tree and the token layout).

    from megavla.model import build_model, flops_per_sample
    model = build_model(cfg.model)          # VLA; model(batch) -> {"loss", "flow", "fast", ...}
"""
from .flops import flops_per_sample, parameter_counts
from .vla import VLA, build_model

__all__ = ["VLA", "build_model", "flops_per_sample", "parameter_counts"]
