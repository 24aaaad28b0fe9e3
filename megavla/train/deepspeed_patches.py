"""Patches of DeepSpeed and torch internals that the trainer needs, in one place.

Each one keeps a cost or a failure out of an eager (never compiled) training process and is scoped
as narrowly as DeepSpeed allows: process start (a CPU-only build: no shared-memory op JIT build, no
triton import), engine build (no torch._dynamo import), and one optimizer step (no clipping of an
update the ZeRO-0 non-finite check emptied). Everything here names the DeepSpeed behaviour it works
around; a DeepSpeed upgrade that changes one of them shows up in tests/test_train_launch.py (launch
cost) and tests/test_train_faults.py (ZeRO-0 non-finite steps).
"""
from __future__ import annotations

import contextlib
import sys
import types

import torch


def skip_shm_comm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory comm op on CPU at init (~46 s, see platform-facts).
    We only use gloo collectives, so replace the builder with a no-op before the backend exists."""
    import importlib
    # (not `import deepspeed.comm.torch as m`: that resolves to the `torch` attribute of
    # deepspeed.comm, which is the torch package itself)
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def skip_deepspeed_triton_import() -> None:
    """DeepSpeed's engine imports its Triton ops (AutoEP's ReplacementSourceMap lives beside them)
    on every `initialize`, and their shared module imports triton (~0.08 CPU-s of every process
    start) only to learn that no GPU backend is active. A CPU-only torch has none, so we register
    that module with its answer on such a build: `_TRITON_AVAILABLE` False (every DeepSpeed Triton
    kernel is defined and used under that flag), triton and tl None. GPU builds are left alone."""
    name = "deepspeed.ops.triton_ops._triton"
    if torch.version.cuda is not None or torch.version.hip is not None or name in sys.modules:
        return
    module = types.ModuleType(name, "DeepSpeed's Triton availability on a CPU-only torch: none "
                                    "(megavla.train.deepspeed_patches.skip_deepspeed_triton_import)")
    module._TRITON_AVAILABLE, module.triton, module.tl = False, None, None
    module.is_triton_available = lambda: False
    sys.modules[name] = module


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
    imports it on every call: `optim.EagerAdamW.step` skips that wrapper. (3) DeepSpeed imports its Muon
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




@contextlib.contextmanager
def clipping_off(engine):
    """Inside: the engine does not clip gradients. For the ZeRO-0 step whose non-finite gradients
    the trainer dropped (every p.grad None): DeepSpeed's fp32 clipping indexes the first gradient and
    would fail on that empty step. An instance attribute shadows DeepSpeed's method for this one
    `engine.step()` and is removed after it, so later steps clip as configured."""
    engine.gradient_clipping = lambda: 0.0
    try:
        yield
    finally:
        engine.__dict__.pop("gradient_clipping", None)
