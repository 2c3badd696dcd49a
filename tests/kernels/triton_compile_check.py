"""Compile the Triton kernels ahead of time for real GPU targets, with no GPU present.

Triton's frontend, LLVM and ptxas (bundled in the wheel) run offline, so this catches kernel code
that only the interpreter accepts (non-constexpr globals, bad dot shapes, shared memory blow-ups).
Must run with TRITON_INTERPRET unset: the interpreter replaces triton's standard library.

    python tests/kernels/triton_compile_check.py            # sm_90, bf16, attention + norm
    python tests/kernels/triton_compile_check.py --full     # + fp32, every kernel, + ROCm gfx942
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
from tusk.kernels import triton_kernels as tk


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
    print(json.dumps(results))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
