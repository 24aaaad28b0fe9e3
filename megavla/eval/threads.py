"""Torch CPU threads for in-process inference and evaluation: the one rule that `megavla.load_policy`,
`megavla serve`, `megavla experiment closed-loop | probe` and the experiments' evaluations use.

One policy call of a small model is many tiny matmuls. With torch's default of one intra-op thread
per core, on a machine whose cores are busy (training, a simulator, other clients), the OpenMP
threads spin-wait for each other: on a loaded 2-core box a call took 2.5-3.8 s with the default
threads and 0.04 s with one (a closed-loop evaluation 285 s vs 9 s). So in-process inference on the
CPU uses one thread unless the user says otherwise:

1. an explicit count (``threads=`` / ``--threads N`` / ``eval.cpu_threads``) wins; 0 leaves torch's
   setting alone;
2. else ``OMP_NUM_THREADS``, when set (torch applied it at import; it is left as it is);
3. else 1.

A large model on an otherwise idle many-core machine is faster with more: pass ``--threads N`` or
set ``OMP_NUM_THREADS=N``.
"""
from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger(__name__)


def inference_threads(requested: int | None = None) -> int | None:
    """The intra-op thread count the rule above picks; None = leave torch's setting as it is."""
    if requested is not None:
        if requested < 0:
            raise ValueError(f"threads={requested} must be >= 0 (0 = torch's own setting)")
        return requested or None
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return 1


def use_inference_threads(requested: int | None = None) -> int:
    """Apply the rule to this process; returns the thread count now in effect."""
    import torch
    n = inference_threads(requested)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
        log.info("torch CPU threads for inference: %d (set --threads N or OMP_NUM_THREADS=N to change)", n)
    return torch.get_num_threads()


@contextlib.contextmanager
def inference_threads_scope(requested: int | None = None):
    """The rule for the duration of a block (an evaluation inside a longer command), then restored."""
    import torch
    before = torch.get_num_threads()
    use_inference_threads(requested)
    try:
        yield
    finally:
        torch.set_num_threads(before)
