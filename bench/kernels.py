"""Kernel benchmark: each op on every available backend, the reference, and a plain-torch baseline.

For each op it prints the time of the reference, the torch and Triton backends, and the best
plain-torch equivalent (attention: SDPA over the same KV laid out contiguously), with achieved
GB/s (memory-bound ops) or TFLOP/s (attention), and on a GPU the percentage of the device's peak.
Timings interleave the contenders round by round and keep each one's best round, which is the
most stable statistic on a shared machine. The last line is one JSON object.

    python bench/kernels.py                 # CPU: fp32, 1 thread
    python bench/kernels.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tusk.kernels.registry import UnsupportedBackendError, ops, triton_available

from tusk import kernels as K

DECODE_TARGET = 1.5  # issue target: CPU torch paged decode within 1.5x of contiguous SDPA


@dataclass
class Case:
    name: str
    op: str
    args: tuple
    baseline: Callable[[], object]
    bytes_moved: float
    flops: float = 0.0
    notes: dict = field(default_factory=dict)


def _paged(lens: list[int], block_size: int, kv_heads: int, dim: int, dtype, device, spare: int = 8):
    """A paged cache with shuffled blocks, plus the same KV laid out contiguously [B, Hkv, S, D]."""
    needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(needed) + spare
    order = torch.randperm(num_blocks)
    tables = torch.zeros(len(lens), max(needed), dtype=torch.int32)
    used = 0
    for row, n in enumerate(needed):
        tables[row, :n] = order[used : used + n].int()
        used += n
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    tables = tables.to(device)
    width = max(needed) * block_size
    k_contig = k_cache[tables.long()].reshape(len(lens), width, kv_heads, dim).transpose(1, 2).contiguous()
    v_contig = v_cache[tables.long()].reshape(len(lens), width, kv_heads, dim).transpose(1, 2).contiguous()
    return k_cache, v_cache, tables, k_contig, v_contig


def _best_sdpa(q4_fold, q4_gqa, keys, values, scale, mask=None, is_causal=False):
    """The faster of the two plain SDPA formulations of GQA (folded heads vs enable_gqa)."""

    def folded():
        return F.scaled_dot_product_attention(
            q4_fold, keys, values, attn_mask=mask, scale=scale, is_causal=is_causal
        )

    def gqa():
        return F.scaled_dot_product_attention(
            q4_gqa, keys, values, attn_mask=mask, scale=scale, is_causal=is_causal, enable_gqa=True
        )

    return folded, gqa


def build_cases(device: torch.device, dtype: torch.dtype, big: bool) -> list[Case]:
    gen_device = device
    elem = torch.empty(0, dtype=dtype).element_size()
    tokens = 2048 if big else 256
    hidden = 4096
    cases: list[Case] = []

    x = torch.randn(tokens, hidden, dtype=dtype, device=gen_device)
    residual = torch.randn_like(x)
    weight = torch.randn(hidden, dtype=dtype, device=gen_device)
    cases.append(Case("rms_norm", "rms_norm", (x, weight, 1e-6),
                      lambda: F.rms_norm(x, (hidden,), weight, 1e-6), 2 * x.numel() * elem))  # fmt: skip
    cases.append(Case("fused_add_rms_norm", "fused_add_rms_norm", (x, residual, weight, 1e-6),
                      lambda: F.rms_norm(x + residual, (hidden,), weight, 1e-6), 4 * x.numel() * elem))  # fmt: skip

    inter = 4096 if not big else 11008
    gate_up = torch.randn(tokens, 2 * inter, dtype=dtype, device=gen_device)
    cases.append(Case("silu_and_mul", "silu_and_mul", (gate_up,),
                      lambda: F.silu(gate_up[:, :inter]) * gate_up[:, inter:], 3 * tokens * inter * elem))  # fmt: skip

    q_heads, kv_heads, dim = 32, 8, 128
    cache = K.rope_cos_sin_cache(dim, 8192, 500000.0, None, dtype, device)
    positions = torch.randint(0, 8192, (tokens,), device=device)
    q = torch.randn(tokens, q_heads, dim, dtype=dtype, device=device)
    k = torch.randn(tokens, kv_heads, dim, dtype=dtype, device=device)

    def hf_rotary():
        cos = cache[positions, : dim // 2].repeat(1, 2)[:, None]
        sin = cache[positions, dim // 2 :].repeat(1, 2)[:, None]

        def rot(t):
            return torch.cat([-t[..., dim // 2 :], t[..., : dim // 2]], dim=-1)

        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    cases.append(Case("apply_rotary", "apply_rotary", (q, k, positions, cache, True), hf_rotary,
                      2 * (q.numel() + k.numel()) * elem))  # fmt: skip

    block_size = 16
    num_blocks = tokens // block_size + 4
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, dim, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(num_blocks * block_size, device=device)[:tokens]
    v = torch.randn_like(k)
    flat_k, flat_v = k_cache.view(-1, kv_heads, dim), v_cache.view(-1, kv_heads, dim)
    cases.append(Case("write_kv_cache", "write_kv_cache", (k, v, k_cache, v_cache, slots),
                      lambda: (flat_k.index_copy_(0, slots, k), flat_v.index_copy_(0, slots, v)),
                      4 * k.numel() * elem))  # fmt: skip

    for label, lens in (
        ("uniform", [4096 if big else 1024] * (32 if big else 16)),
        ("ragged", torch.randint(1, 2048 if big else 1024, (32 if big else 16,)).tolist()),
    ):
        kc, vc, tables, k_contig, v_contig = _paged(lens, block_size, kv_heads, dim, dtype, device)
        n_seqs = len(lens)
        dq = torch.randn(n_seqs, q_heads, dim, dtype=dtype, device=device)
        lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
        mask = None
        if label == "ragged":
            mask = (torch.arange(k_contig.shape[2], device=device)[None] < lens_t[:, None])[:, None, None, :]
        fold, gqa = _best_sdpa(
            dq.view(n_seqs, kv_heads, q_heads // kv_heads, dim),
            dq[:, :, None],
            k_contig,
            v_contig,
            dim**-0.5,
            mask,
        )
        total = sum(lens)
        cases.append(Case(f"paged_decode_attention[{label}]", "paged_decode_attention",
                          (dq, kc, vc, lens_t, tables, dim**-0.5), fold,
                          2 * total * kv_heads * dim * elem, 4 * total * q_heads * dim,
                          {"alt_baseline": gqa, "lens": f"{n_seqs} seqs, {total} tokens"}))  # fmt: skip

    seq = 4096 if big else 512
    kc, vc, tables, k_contig, v_contig = _paged([seq], block_size, kv_heads, dim, dtype, device)
    pq = torch.randn(seq, q_heads, dim, dtype=dtype, device=device)
    cu = torch.tensor([0, seq], dtype=torch.int32, device=device)
    lens_t = torch.tensor([seq], dtype=torch.int32, device=device)
    fold_q = pq.transpose(0, 1)[None]
    fold, _ = _best_sdpa(fold_q, fold_q, k_contig, v_contig, dim**-0.5, is_causal=True)

    def causal_sdpa():
        return F.scaled_dot_product_attention(
            fold_q, k_contig, v_contig, is_causal=True, scale=dim**-0.5, enable_gqa=True
        )

    causal_pairs = seq * (seq + 1) / 2
    cases.append(Case("paged_prefill_attention", "paged_prefill_attention",
                      (pq, kc, vc, cu, lens_t, tables, dim**-0.5), causal_sdpa,
                      (pq.numel() * 2 + k_contig.numel() * 2) * elem, 4 * causal_pairs * q_heads * dim))  # fmt: skip

    rows, vocab = 32, 128256 if big else 32000
    logits = torch.randn(rows, vocab, device=device)
    batch = K.SamplingBatch(
        temperature=torch.full((rows,), 0.8),
        top_p=torch.full((rows,), 0.9),
        top_k=torch.full((rows,), 50, dtype=torch.int32),
        seeds=list(range(rows)),
        steps=[0] * rows,
    )
    cases.append(Case("sample", "sample", (logits, batch),
                      lambda: torch.multinomial(torch.softmax(logits / 0.8, dim=-1), 1), logits.numel() * 4))  # fmt: skip

    layers = 8
    kv_all = torch.randn(layers, 2, 64, block_size, kv_heads, dim, dtype=dtype, device=device)
    block_ids = torch.randperm(64, device=device)[:32]
    blocks = kv_all[:, :, block_ids].permute(2, 0, 1, 3, 4, 5).contiguous()
    block_bytes = blocks.numel() * elem
    cases.append(Case("gather_kv_blocks", "gather_kv_blocks", (kv_all, block_ids),
                      lambda: kv_all[:, :, block_ids].permute(2, 0, 1, 3, 4, 5).contiguous(), 2 * block_bytes))  # fmt: skip

    def scatter_baseline():
        kv_all[:, :, block_ids] = blocks.permute(1, 2, 0, 3, 4, 5)

    cases.append(Case("scatter_kv_blocks", "scatter_kv_blocks", (blocks, kv_all, block_ids), scatter_baseline,
                      2 * block_bytes))  # fmt: skip
    return cases


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "xpu":
        torch.xpu.synchronize()


def time_interleaved(
    fns: dict[str, Callable], device: torch.device, rounds: int, budget_s: float
) -> dict[str, float]:
    """Best seconds per contender; a round runs each contender once, in turn."""
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn()
    _sync(device)
    started = time.perf_counter()
    for done in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
        if done >= 2 and time.perf_counter() - started > budget_s:
            break
    return best


def run_backend_fn(op: str, backend: str, args: tuple) -> Callable | None:
    impl = ops()[op].impls.get(backend)
    if impl is None:
        return None
    key = args[ops()[op].key_arg]
    reason = impl.unsupported_reason(K.device_kind(key.device), key.dtype, args)
    if reason is not None:
        return None
    return lambda: K.run_backend(op, backend, *args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 = steadier on shared machines)"
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--budget-s", type=float, default=8.0, help="time cap per op")
    parser.add_argument("--big", action="store_true", help="GPU-sized shapes (4k context, 128k vocab)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    info = K.detect_device(device)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    )
    big = args.big or device.type != "cpu"
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    triton_reason = (
        triton_available(info.kind) if device.type != "cpu" else "not benchmarked on CPU (interpreter)"
    )
    print(f"# device: {info.kind} {info.name} | dtype {str(dtype).removeprefix('torch.')} | "
          f"threads {torch.get_num_threads()} | triton: {triton_reason or 'available'}")  # fmt: skip
    if device.type == "cpu":
        print("# no GPU in this run: Triton kernels are not timed and no percent-of-peak is reported")

    summary: dict = {}
    for case in build_cases(device, dtype, big):
        fns: dict[str, Callable] = {"reference": lambda c=case: K.run_backend(c.op, "reference", *c.args)}
        for backend in ("torch", "triton"):
            if backend == "triton" and device.type == "cpu":
                continue
            fn = run_backend_fn(case.op, backend, case.args)
            if fn is not None:
                fns[backend] = fn
        fns["baseline"] = case.baseline
        if "alt_baseline" in case.notes:
            fns["baseline_alt"] = case.notes["alt_baseline"]
        times = time_interleaved(fns, device, args.rounds, args.budget_s)
        if "baseline_alt" in times:
            times["baseline"] = min(times["baseline"], times.pop("baseline_alt"))
        entry: dict = {f"{name}_ms": round(t * 1e3, 4) for name, t in times.items()}
        for name, t in times.items():
            if case.flops:
                entry[f"{name}_tflops"] = round(case.flops / t / 1e12, 4)
            entry[f"{name}_gbps"] = round(case.bytes_moved / t / 1e9, 3)
            if info.memory_bandwidth_gbs and device.type != "cpu":
                entry[f"{name}_pct_peak_bw"] = round(
                    100 * case.bytes_moved / t / 1e9 / info.memory_bandwidth_gbs, 1
                )
            if case.flops and info.peak_bf16_tflops and device.type != "cpu":
                entry[f"{name}_pct_peak_flops"] = round(
                    100 * case.flops / t / 1e12 / info.peak_bf16_tflops, 1
                )
        entry["torch_vs_baseline"] = round(times["torch"] / times["baseline"], 3)
        if "triton" in times:
            entry["triton_vs_baseline"] = round(times["triton"] / times["baseline"], 3)
        summary[case.name] = entry
        cols = " ".join(f"{n}={t * 1e3:.3f}ms" for n, t in times.items())
        rate = (
            f"{case.flops / times['torch'] / 1e12:.3f} TFLOP/s"
            if case.flops
            else f"{case.bytes_moved / times['torch'] / 1e9:.2f} GB/s"
        )
        print(
            f"{case.name:32s} {cols} | torch {rate} | torch/baseline {entry['torch_vs_baseline']:.2f}x",
            flush=True,
        )

    decode = summary["paged_decode_attention[uniform]"]["torch_vs_baseline"]
    result = {
        "bench": "kernels",
        "device": f"{info.kind}:{info.name}",
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "gpu": device.type != "cpu",
        "decode_torch_vs_contiguous_sdpa": decode,
        "decode_ragged_torch_vs_padded_sdpa": summary["paged_decode_attention[ragged]"]["torch_vs_baseline"],
        "decode_target_x": DECODE_TARGET,
        "decode_target_met": decode <= DECODE_TARGET,
        "ops": summary,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except UnsupportedBackendError as exc:
        raise SystemExit(f"error: {exc}") from exc
