"""Compile the Triton kernels ahead of time for real GPU targets, with no GPU present.

Triton's frontend, LLVM and ptxas (bundled in the wheel) run offline, so this catches kernel code
that only the interpreter accepts (non-constexpr globals, bad dot shapes, shared memory blow-ups).
Must run with TRITON_INTERPRET unset: the interpreter replaces triton's standard library.

    python tests/kernels/triton_compile_check.py            # sm_90, bf16, attention + norm;
                                                            # + shared-memory limits (below)
    python tests/kernels/triton_compile_check.py --full     # + fp32, every kernel, + ROCm gfx942

Shared-memory limits: for gfx942 (MI300X, 64 KiB LDS), sm_89 (L4/L40S/RTX 40xx, 99 KiB) and
sm_90 (H100/H200, 227 KiB), the fp32 attention configs the Triton backend would use on that
target, at head dim 128 (the one with the largest estimate it allows), must compile to at most
the target's shared memory and to at most the backend's estimate. fp32 is the worst case: bf16 tiles take half the bytes.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
from tusk.kernels import triton_backend as tb
from tusk.kernels import triton_kernels as tk
from tusk.kernels.device import shared_memory_limit

LIMIT_TARGETS = {"gfx942": GPUTarget("hip", "gfx942", 64), "sm_89": GPUTarget("cuda", 89, 32),
                 "sm_90": GPUTarget("cuda", 90, 32)}  # fmt: skip


def _source(kernel, types: dict[str, str], constexprs: dict[str, object]) -> ASTSource:
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: ("constexpr" if n in constexprs else types.get(n, "i32")) for n in names}
    consts = {(names.index(n),): v for n, v in constexprs.items()}
    return ASTSource(fn=JITFunction(kernel.fn), signature=signature, constexprs=consts)


def kernel_specs(dt: str, full: bool):
    p = "*" + dt
    f32 = dt == "fp32"
    dots = {"COMPUTE_F32": f32, "PRECISION": "ieee" if f32 else "tf32"}
    attention_types = {
        "q_ptr": p,
        "kc_ptr": p,
        "vc_ptr": p,
        "tables_ptr": "*i32",
        "lens_ptr": "*i32",
        "out_ptr": p,
        "scale": "fp32",
    }
    partials = {"part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "part_acc_ptr": "*fp32"}
    yield (
        "paged_decode_kernel",
        {**attention_types, **partials},
        {"NUM_SPLITS": 4, **dots, "BLOCK_G": 16, "BLOCK_N": 64, "BLOCK_D": 128},
    )
    yield "decode_reduce_kernel", {**partials, "out_ptr": p}, {"NUM_SPLITS": 4, "BLOCK_S": 4, "BLOCK_D": 128}
    yield (
        "paged_prefill_kernel",
        {**attention_types, "cu_ptr": "*i32"},
        {**dots, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 128},
    )
    norm_ptrs = {n: p for n in ("x_ptr", "res_ptr", "w_ptr", "out_ptr", "res_out_ptr")}
    yield "rms_norm_kernel", {**norm_ptrs, "eps": "fp32"}, {"HAS_RESIDUAL": True, "BLOCK_H": 4096}
    if full:
        yield (
            "paged_decode_kernel",
            {**attention_types, **partials},
            {"NUM_SPLITS": 1, **dots, "BLOCK_G": 16, "BLOCK_N": 32, "BLOCK_D": 64},
        )
        yield "silu_and_mul_kernel", {"x_ptr": p, "out_ptr": p}, {"BLOCK": 1024}
        yield (
            "rotary_kernel",
            {"x_ptr": p, "out_ptr": p, "pos_ptr": "*i64", "cache_ptr": p},
            {"IS_NEOX": False, "BLOCK_H": 16, "BLOCK_R": 64},
        )
        kv = {"k_ptr": p, "v_ptr": p, "kc_ptr": p, "vc_ptr": p, "slot_ptr": "*i64"}
        yield "write_kv_kernel", kv, {"BLOCK_H": 8, "BLOCK_D": 128}


def limit_specs(head_dim: int = 128, group: int = 4):
    """(target, kernel, types, constexprs, options, estimate) of the configs to hold to each limit."""
    p = "*fp32"
    dots = {"COMPUTE_F32": True, "PRECISION": "ieee"}
    attention = {"q_ptr": p, "kc_ptr": p, "vc_ptr": p, "tables_ptr": "*i32", "lens_ptr": "*i32",
                 "out_ptr": p, "scale": "fp32"}  # fmt: skip
    partials = {"part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "part_acc_ptr": "*fp32"}
    block_g, block_d = max(16, tb._p2(group)), max(16, tb._p2(head_dim))
    for name in LIMIT_TARGETS:
        limit = shared_memory_limit(name)

        def largest(configs, rows, target=name):
            """The allowed config with the largest estimate: where the bound is tightest."""

            def size(c):
                return tb.attention_shared_bytes(rows(c), c["BLOCK_N"], block_d, torch.float32, target, True)

            worst = max(configs, key=size)
            return [(worst, size(worst))]

        decode = tb.decode_candidates(torch.float32, group, head_dim, name, limit, [4], 4, True)
        for config, estimate in largest(decode, lambda c: block_g):
            constexprs = {"NUM_SPLITS": config["splits"], **dots, "BLOCK_G": block_g,
                          "BLOCK_N": config["BLOCK_N"], "BLOCK_D": block_d}  # fmt: skip
            yield name, "paged_decode_kernel", {**attention, **partials}, constexprs, {
                "num_warps": config["num_warps"]}, estimate  # fmt: skip
        prefill = tb.prefill_candidates(torch.float32, head_dim, name, limit, True)
        for config, estimate in largest(prefill, lambda c: c["BLOCK_M"]):
            constexprs = {
                **dots,
                "BLOCK_M": config["BLOCK_M"],
                "BLOCK_N": config["BLOCK_N"],
                "BLOCK_D": block_d,
            }
            options = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
            yield name, "paged_prefill_kernel", {**attention, "cu_ptr": "*i32"}, constexprs, options, estimate


def check_limits() -> list[dict]:
    results = []
    for name, kernel, types, constexprs, options, estimate in limit_specs():
        row = {"kernel": kernel, "target": name, "dtype": "fp32", "limit": shared_memory_limit(name),
               "estimate": estimate, "config": {**constexprs, **options}}  # fmt: skip
        try:
            compiled = triton.compile(_source(getattr(tk, kernel), types, constexprs), target=LIMIT_TARGETS[name],
                                      options=options)  # fmt: skip
            shared = compiled.metadata.shared
            row.update(ok=shared <= row["limit"] and shared <= estimate, shared_bytes=shared)
        except Exception as exc:  # report every failure, not just the first
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
        results.append(row)
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET first", file=sys.stderr)
        return 2
    targets = [GPUTarget("cuda", 90, 32)] + ([GPUTarget("hip", "gfx942", 64)] if args.full else [])
    dtypes = ["bf16", "fp32"] if args.full else ["bf16"]
    results = []
    for target in targets:
        for dt in dtypes:
            for name, types, constexprs in kernel_specs(dt, args.full):
                try:
                    compiled = triton.compile(_source(getattr(tk, name), types, constexprs), target=target)
                    results.append({"kernel": name, "target": f"{target.backend}:{target.arch}", "dtype": dt,
                                    "ok": True, "shared_bytes": compiled.metadata.shared})  # fmt: skip
                except Exception as exc:  # report every failure, not just the first
                    results.append({"kernel": name, "target": f"{target.backend}:{target.arch}", "dtype": dt,
                                    "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]})  # fmt: skip
    results += check_limits()
    print(json.dumps(results))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
