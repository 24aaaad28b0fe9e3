"""Compile every Triton kernel ahead of time for an H100 (sm_90) on this CPU-only machine.

The interpreter checks the arithmetic but not GPU code generation (type promotion, loop forms,
register/shared-memory limits, PTX). `triton.compile` with a GPUTarget runs the whole CUDA pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin) without a GPU, for bf16 and fp32 signatures at the block
sizes the dispatch picks on CUDA.
"""
from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")

from megavla.kernels.dispatch import INTERPRETED_AT_IMPORT  # noqa: E402

pytestmark = pytest.mark.skipif(INTERPRETED_AT_IMPORT, reason="kernels were imported interpreted")


def kernel_specs(dt: str):
    import importlib

    # importlib, not `from megavla.kernels import geglu`: the package exports functions named like
    # their modules (geglu, attention), which shadow the submodule attributes
    from megavla.kernels.dispatch import define_kernels
    assert define_kernels()   # a CPU-only torch defines them only on request (they cannot run there)
    fm, gg, rn, rp = (importlib.import_module(f"megavla.kernels.{m}") for m in ("flow_matching", "geglu", "rmsnorm", "rope"))
    p, f32, i32 = f"*{dt}", "*fp32", "i32"
    return {
        "flow_noise": (fm._flow_noise_kernel, [p, p, f32, p, i32], {"BLOCK": 1024}),
        "fm_loss_fwd": (fm._fm_loss_fwd_kernel, [p, f32, f32, "*u8", "*u8", f32, f32, i32, i32], {"BLOCK": 2048}),
        "fm_loss_bwd": (fm._fm_loss_bwd_kernel, [p, f32, f32, "*u8", "*u8", f32, f32, p, i32, i32], {"BLOCK": 1024}),
        "rms_fwd_ada": (rn._rms_norm_fwd_kernel, [p, p, p, p, f32, i32, i32, i32, i32, "fp32"],
                        {"ROWS": 4, "BLOCK_D": 1024, "HAS_SHIFT": True}),
        "rms_fwd_gemma": (rn._rms_norm_fwd_kernel, [p, p, p, p, f32, i32, i32, i32, i32, "fp32"],
                          {"ROWS": 52, "BLOCK_D": 2048, "HAS_SHIFT": False}),
        "rms_bwd_ada": (rn._rms_norm_bwd_kernel, [p, p, p, p, f32, f32, f32, i32, i32, i32, i32],
                        {"ROWS": 4, "BLOCK_D": 1024, "HAS_SHIFT": True}),
        "rms_bwd_gemma": (rn._rms_norm_bwd_kernel, [p, p, p, p, f32, f32, f32, i32, i32, i32, i32],
                          {"ROWS": 52, "BLOCK_D": 2048, "HAS_SHIFT": False}),
        "rope": (rp._rope_kernel, [p, p, "*i64", f32] + [i32] * 11,
                 {"SIN_SIGN": -1, "ROWS": 27, "BLOCK_H": 8, "BLOCK_HALF": 128}),
        "geglu_fwd": (gg._geglu_fwd_kernel, [p, p, p, i32], {"BLOCK": 1024}),
        "geglu_bwd": (gg._geglu_bwd_kernel, [p, p, p, p, p, i32], {"BLOCK": 1024}),
    }


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return bool(get_ptxas(90).path)
    except Exception:
        return False


# fp32 differs from bf16 only in load/store types: slow suite only, to keep the default suite short
@pytest.mark.parametrize("dt", ["bf16", pytest.param("fp32", marks=pytest.mark.slow)])
def test_every_kernel_compiles_for_sm90(dt):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not _ptxas_available():
        pytest.skip("no ptxas (CUDA toolkit or triton's bundled one) to finish the sm_90 build")

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence the 3.9 deprecation warning
    failures = {}
    for name, (kernel, arg_types, constexprs) in kernel_specs(dt).items():
        names = [n for n in kernel.arg_names if n not in constexprs]
        assert len(names) == len(arg_types), f"{name}: spec has {len(arg_types)} types for {names}"
        signature = {**dict(zip(names, arg_types)), **{k: "constexpr" for k in constexprs}}
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", 90, 32))
        except Exception as exc:  # collect all, report together
            failures[name] = f"{type(exc).__name__}: {str(exc)[:400]}"
            continue
        assert compiled.asm.get("ptx"), f"{name}: no PTX produced"
    assert not failures, failures
