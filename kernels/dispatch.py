"""Choosing between a Triton kernel and its plain-torch reference.

Every op in ``megavla.kernels`` takes ``impl="auto" | "triton" | "torch"``:

* ``"torch"``  - the plain-torch reference (always available, differentiable, any device).
* ``"triton"`` - the fused Triton kernel; an error if it cannot run on these tensors.
* ``"auto"``   - Triton when the tensors are on CUDA, or when ``TRITON_INTERPRET=1`` was set before
  the kernel modules were imported (CPU interpreter, used by tests); else torch.

Triton decides at ``@triton.jit`` decoration time whether a kernel is interpreted, so the interpreter
state that matters is the one at import time (`INTERPRETED_AT_IMPORT`), not the current environment.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys

import torch

logger = logging.getLogger(__name__)

IMPLS = ("auto", "triton", "torch")
INTERPRETED_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The kernels run on CUDA tensors (a CUDA or ROCm build of torch) or on CPU under the interpreter.
# A CPU-only torch without TRITON_INTERPRET=1 can run none of them, so triton is not imported there:
# that import cost ~0.08 CPU-s of every process start (issue 16: launch) for kernels never called.
KERNELS_CAN_RUN = INTERPRETED_AT_IMPORT or torch.version.cuda is not None or torch.version.hip is not None

triton = None  # type: ignore[assignment]
tl = None  # type: ignore[assignment]
TRITON_IMPORT_ERROR: str | None = None
if KERNELS_CAN_RUN:
    try:  # triton ships with CUDA torch; on a CPU box it is an optional extra
        import triton  # type: ignore[no-redef]  # noqa: F401
        import triton.language as tl  # type: ignore[no-redef]  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        triton = tl = None
        TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
elif importlib.util.find_spec("triton") is None:
    TRITON_IMPORT_ERROR = "ModuleNotFoundError: No module named 'triton'"

_warned_env_change = False


def triton_available() -> bool:
    """Whether triton is installed (and, where the kernels can run, imported without error)."""
    return TRITON_IMPORT_ERROR is None


def kernels_defined() -> bool:
    """Whether this process imported triton and defines the kernels (see KERNELS_CAN_RUN)."""
    return triton is not None


KERNEL_MODULES = ("flow_matching", "geglu", "rmsnorm", "rope")


def define_kernels() -> bool:
    """Import triton and define the kernels in this process also where they cannot run (a CPU-only
    torch): for ahead-of-time compilation for a GPU target (tests/test_kernels_sm90_compile.py).
    Kernel modules imported before are re-executed in place (importlib.reload keeps each module's
    namespace, so functions already imported from them see the kernels). True if they are defined."""
    global triton, tl, TRITON_IMPORT_ERROR
    if triton is None and TRITON_IMPORT_ERROR is None:
        try:
            import triton as imported  # noqa: F811
            import triton.language as imported_tl
        except Exception as exc:  # pragma: no cover - depends on the install
            TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
            return False
        triton, tl = imported, imported_tl
        for name in KERNEL_MODULES:
            module = sys.modules.get(f"{__package__}.{name}")
            if module is not None:
                importlib.reload(module)
    return kernels_defined()


def triton_can_run(*tensors: torch.Tensor) -> tuple[bool, str]:
    """Whether the Triton kernels can run on these tensors, and if not, why."""
    if not triton_available():
        return False, f"triton does not import ({TRITON_IMPORT_ERROR}); pip install 'megavla[triton]'"
    tensors = tuple(t for t in tensors if isinstance(t, torch.Tensor))
    if any(t.dtype == torch.float64 for t in tensors):
        return False, "float64 inputs (the kernels compute in fp32; the torch reference keeps fp64)"
    devices = {t.device.type for t in tensors}
    if len({t.device for t in tensors}) > 1:
        return False, f"tensors on several devices {sorted(str(t.device) for t in tensors)}"
    if devices == {"cuda"}:
        return True, ""
    if devices <= {"cpu"} and INTERPRETED_AT_IMPORT:
        return True, ""
    if devices <= {"cpu"}:
        global _warned_env_change
        if os.environ.get("TRITON_INTERPRET", "0") == "1" and not _warned_env_change:
            _warned_env_change = True
            logger.warning(
                "TRITON_INTERPRET=1 was set after megavla.kernels was imported; the kernels were "
                "compiled for GPU, so CPU tensors use the torch reference. Set it before importing.")
        return False, ("tensors are on CPU and TRITON_INTERPRET=1 was not set before importing "
                       "megavla.kernels")
    return False, f"tensors on devices {sorted(devices)}; Triton needs all on one CUDA device"


def resolve_impl(impl: str, *tensors: torch.Tensor, op: str = "kernel") -> str:
    """Return "triton" or "torch" for this call, raising a clear error for impossible requests."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl={impl!r} is not one of {IMPLS} (config field model.kernels)")
    if impl == "torch":
        return "torch"
    ok, why = triton_can_run(*tensors)
    if impl == "triton" and not ok:
        raise RuntimeError(f"{op}: impl='triton' cannot run: {why}. Use impl='auto' or 'torch'.")
    return "triton" if ok else "torch"
