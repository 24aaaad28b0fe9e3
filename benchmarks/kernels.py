"""Kernel benchmark: eager torch vs torch.compile vs Triton (and the attention backends), fwd and fwd+bwd.

    python benchmarks/kernels.py                 # realistic shapes (GPU), bf16
    python benchmarks/kernels.py --quick         # tiny shapes, fp32: a smoke run that works on CPU
    python benchmarks/kernels.py --ops rms_norm,attention --out table.md

Shapes (full): batch 32, H=50 actions, action dim 32, expert width 1024 (MLP 4096), Gemma-2B
prefix width 2048; attention: prefix 800 + suffix 50 tokens, 8 query heads, 1 KV head, head dim 256.
GB/s counts the bytes an ideal fused kernel must move (each input read once, each output written
once), the same for every implementation, so it compares directly with the HBM peak. Attention
TFLOP/s counts only the visible (unmasked) query-key pairs: 4*D flops per pair forward, 2.5x that
backward. On CPU the Triton column needs TRITON_INTERPRET=1 (interpreted: timings meaningless).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from megavla.kernels import EXPERT, PREFIX, AttentionLayout, attention
from megavla.kernels import ada_rms_norm, apply_rope, flow_matching_loss, flow_noise, geglu, rms_norm
from megavla.kernels.attention import _flash_attn_varlen_func
from megavla.kernels.dispatch import triton_can_run
from megavla.kernels.flow_matching import flow_matching_loss_reference, flow_noise_reference
from megavla.kernels.geglu import geglu_reference
from megavla.kernels.rmsnorm import ada_rms_norm_reference, rms_norm_reference
from megavla.kernels.rope import apply_rope_reference

logger = logging.getLogger("benchmarks.kernels")
HBM_PEAK_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}  # SXM datasheet figures


@dataclass
class Case:
    op: str
    shape: str
    make: Callable[[], tuple[list, list[int]]]  # -> (args, indices of args that take gradients)
    impls: dict[str, Callable]
    bytes_fwd: float = 0.0
    bytes_fwdbwd: float = 0.0
    flops_fwd: float = 0.0  # attention only


def timed(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median milliseconds per call."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=10, rep=max(reps, 25), return_mode="median"))
    fn()  # warm-up (compilation, allocator)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def build_cases(device: torch.device, dtype: torch.dtype, quick: bool, compile_: bool) -> list[Case]:
    e = torch.tensor([], dtype=dtype).element_size()
    b, h, a = (2, 4, 6) if quick else (32, 50, 32)
    width, mlp, gemma_width, prefix, suffix = (64, 128, 64, 24, 8) if quick else (1024, 4096, 2048, 800, 50)
    heads, head_dim = (2, 16) if quick else (8, 256)
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    def triple(ref, op):
        impls = {"eager": ref}
        if compile_:
            impls["torch.compile"] = torch.compile(ref, dynamic=False)
        impls["triton"] = lambda *x: op(*x, impl="triton")
        return impls

    dim_mask = (torch.rand(b, a, generator=gen) > 0.2).to(device)
    time_mask = (torch.rand(b, h, generator=gen) > 0.1).to(device)
    n_act = b * h * a
    cases = [
        Case("flow_matching_loss", f"[{b},{h},{a}]", lambda: ([rnd(b, h, a), rnd(b, h, a), rnd(b, h, a)], [0]),
             triple(lambda v, x, n: flow_matching_loss_reference(v, x, n, dim_mask, time_mask),
                    lambda v, x, n, impl: flow_matching_loss(v, x, n, dim_mask, time_mask, impl=impl)),
             bytes_fwd=3 * n_act * e + b * (h + a + 4), bytes_fwdbwd=7 * n_act * e + b * (h + a + 8)),
        Case("flow_noise", f"[{b},{h},{a}]",
             lambda: ([rnd(b, h, a), rnd(b, h, a), torch.rand(b, generator=gen).to(device)], []),
             triple(flow_noise_reference, flow_noise), bytes_fwd=3 * n_act * e + 4 * b),
    ]
    rows_prefix = b * (prefix + suffix)
    cases.append(Case("rms_norm (Gemma prefix)", f"[{b},{prefix + suffix},{gemma_width}]",
                      lambda: ([rnd(b, prefix + suffix, gemma_width), rnd(gemma_width, scale=0.1)], [0, 1]),
                      triple(rms_norm_reference, rms_norm),
                      bytes_fwd=2 * rows_prefix * gemma_width * e, bytes_fwdbwd=5 * rows_prefix * gemma_width * e))
    cases.append(Case("ada_rms_norm (expert)", f"[{b},{h},{width}] mod [{b},{width}]",
                      lambda: ([rnd(b, h, width), rnd(b, width, scale=0.3), rnd(b, width)], [0, 1, 2]),
                      triple(ada_rms_norm_reference, ada_rms_norm),
                      bytes_fwd=(2 * b * h + 2 * b) * width * e, bytes_fwdbwd=(5 * b * h + 4 * b) * width * e))
    n_rope = b * heads * (prefix + suffix) * head_dim
    positions = torch.arange(prefix + suffix, device=device).repeat(b, 1)
    cases.append(Case("apply_rope (q)", f"[{b},{heads},{prefix + suffix},{head_dim}]",
                      lambda: ([rnd(b, heads, prefix + suffix, head_dim)], [0]),
                      triple(lambda x: apply_rope_reference(x, positions), lambda x, impl: apply_rope(x, positions, impl=impl)),
                      bytes_fwd=2 * n_rope * e, bytes_fwdbwd=4 * n_rope * e))
    n_glu = b * h * mlp
    cases.append(Case("geglu (expert MLP)", f"[{b},{h},{mlp}]", lambda: ([rnd(b, h, mlp, scale=2.0), rnd(b, h, mlp)], [0, 1]),
                      triple(geglu_reference, geglu), bytes_fwd=3 * n_glu * e, bytes_fwdbwd=8 * n_glu * e))

    # the flow-matching training hot path: prefix + action tokens (FAST tokens would add a causal block)
    kind = torch.tensor([PREFIX] * prefix + [EXPERT] * suffix, device=device).repeat(b, 1)
    valid = torch.ones_like(kind, dtype=torch.bool)
    valid[:, prefix - prefix // 8: prefix] = False  # some prompt padding, as in real batches
    layout = AttentionLayout.from_kinds(kind, valid)
    pairs = float(layout.dense_mask().sum())
    length = prefix + suffix
    attn_impls = {name: (lambda n: (lambda q, k, v: attention(q, k, v, layout, impl=n)))(name)
                  for name in ("eager", "sdpa", "flex")}
    if _flash_attn_varlen_func is not None and device.type == "cuda" and dtype != torch.float32:
        attn_impls["flash"] = lambda q, k, v: attention(q, k, v, layout, impl="flash")
    cases.append(Case("attention (pi0 mask)", f"B{b} L{length} Hq{heads} Hkv1 D{head_dim}",
                      lambda: ([rnd(b, heads, length, head_dim), rnd(b, 1, length, head_dim), rnd(b, 1, length, head_dim)],
                               [0, 1, 2]), attn_impls, flops_fwd=4.0 * head_dim * heads * pairs))
    return cases


def run_case(case: Case, device: torch.device, reps: int) -> list[dict]:
    rows = []
    for impl, fn in case.impls.items():
        row = {"op": case.op, "shape": case.shape, "impl": impl}
        args, grad_idx = case.make()
        if impl == "triton":
            ok, why = triton_can_run(*[x for x in args if isinstance(x, torch.Tensor)])
            if not ok:
                row["note"] = "n/a: " + why.split(";")[0]
                rows.append(row)
                continue
        try:
            row["fwd_ms"] = timed(lambda: fn(*args), device, reps)
            if grad_idx:
                leaves = [x.detach().requires_grad_(i in grad_idx) for i, x in enumerate(args)]
                cotangent = torch.randn_like(fn(*leaves))  # a given dL/dout: no extra reduction timed

                def fwd_bwd():
                    for i in grad_idx:
                        leaves[i].grad = None
                    fn(*leaves).backward(cotangent)

                row["fwdbwd_ms"] = timed(fwd_bwd, device, reps)
        except Exception as exc:  # e.g. flex backward on CPU: report, do not abort the table
            row["note"] = f"{type(exc).__name__}: {str(exc).split('.')[0][:80]}"
        rows.append(row)
    return rows


def format_table(results: list[dict], cases: dict[str, Case], device_name: str, dtype: torch.dtype) -> str:
    peak = next((v for k, v in HBM_PEAK_GBS.items() if k in device_name), None)
    lines = [f"Device: **{device_name}**, dtype {str(dtype)[6:]}, torch {torch.__version__}"
             + (f", HBM peak {peak:.0f} GB/s" if peak else ""), "",
             "| op | shape | impl | fwd ms | fwd GB/s or TFLOP/s | fwd+bwd ms | fwd+bwd GB/s or TFLOP/s "
             "| fwd speedup vs eager | fwd+bwd speedup vs eager | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    eager = {r["op"]: r for r in results if r["impl"] == "eager"}

    def speedup(r, key):
        ref, mine = eager.get(r["op"], {}).get(key), r.get(key)
        return f"{ref / mine:.2f}x" if ref and mine else ""

    def rate(case, ms, both):
        if ms is None:
            return ""
        if case.flops_fwd:
            return f"{case.flops_fwd * (3.5 if both else 1.0) / ms / 1e9:.3g} TF"
        nbytes = case.bytes_fwdbwd if both else case.bytes_fwd
        gbs = nbytes / ms / 1e6
        return f"{gbs:.3g}" + (f" ({100 * gbs / peak:.0f}%)" if peak else "") if nbytes else ""

    for r in results:
        c = cases[r["op"]]
        f, fb = r.get("fwd_ms"), r.get("fwdbwd_ms")
        lines.append(f"| {r['op']} | {r['shape']} | {r['impl']} | {'' if f is None else f'{f:.3f}'} | {rate(c, f, False)} "
                     f"| {'' if fb is None else f'{fb:.3f}'} | {rate(c, fb, True)} | {speedup(r, 'fwd_ms')} "
                     f"| {speedup(r, 'fwdbwd_ms')} | {r.get('note', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes in fp32 (runs on CPU)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 otherwise")
    parser.add_argument("--ops", default="", help="comma-separated substrings of op names to run (default: all)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column (slow cold start on CPU)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", default="", help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" and not args.quick else "fp32")]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    reps = args.reps or (5 if device.type == "cpu" else 100)
    cases = build_cases(device, dtype, args.quick, compile_=not args.no_compile)
    wanted = [w for w in args.ops.split(",") if w]
    cases = [c for c in cases if not wanted or any(w in c.op for w in wanted)]
    if not cases:
        parser.error(f"--ops {args.ops!r} matches no op")
    results = []
    for case in cases:
        logger.info("benchmarking %s %s", case.op, case.shape)
        results += run_case(case, device, reps)
    table = format_table(results, {c.op: c for c in cases}, device_name, dtype)
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
