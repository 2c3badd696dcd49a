"""The `triton` backend: launch wrappers, support declarations and tuned launch configs.

Importing this module does not import triton; the kernels load on the first call. Gather and
scatter of KV blocks and sampling have no Triton kernels: torch's index_select/index_copy and
sort/cumsum are already bandwidth-bound there, so dispatch uses the torch backend for them.
"""

from __future__ import annotations

import torch
from tusk.kernels.autotune import Config, bucket, tuner_for
from tusk.kernels.device import detect_device, shared_memory_limit
from tusk.kernels.registry import FLOAT_DTYPES, register, triton_available

TRITON_DEVICES = frozenset({"cuda", "rocm", "xpu", "cpu"})
MAX_HEAD_DIM = 256
MAX_HIDDEN = 65536

# Tests set this to exercise the split-context decode path on tiny inputs; None = heuristic.
FORCED_DECODE_SPLITS: int | None = None


def _kernels():
    from tusk.kernels import triton_kernels

    return triton_kernels


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _p2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _tune(kernel: str, device: torch.device, shape_bucket: tuple, candidates: list[Config], launch) -> Config:
    """Pick a launch config: the interpreter takes the first; GPUs time candidates once per bucket."""
    if _kernels().interpreting() or device.type == "cpu":
        return candidates[0]
    info = detect_device(device)

    def time_config(config: Config) -> float:
        import triton.testing

        return triton.testing.do_bench(lambda: launch(config), warmup=5, rep=20) / 1e3

    return tuner_for(info.name).best(kernel, shape_bucket, candidates, time_config)


def _bf16_reason(t: torch.Tensor) -> str | None:
    if t.dtype == torch.bfloat16 and t.device.type != "cpu" and not detect_device(t.device).supports_bf16:
        return f"device {t.device} has no bf16 support"
    return None


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _norm(x, residual, weight, eps):
    tk = _kernels()
    hidden = x.shape[-1]
    x2 = _last_dim_contiguous(x.reshape(-1, hidden))
    out = torch.empty_like(x2)
    res_out = torch.empty_like(x2) if residual is not None else out
    r2 = _last_dim_contiguous(residual.reshape(-1, hidden)) if residual is not None else x2
    weight = weight.contiguous()
    block = _p2(hidden)

    def launch(config: Config) -> None:
        tk.rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, res_out, hidden,
            x2.stride(0), r2.stride(0), out.stride(0), res_out.stride(0), eps,
            HAS_RESIDUAL=residual is not None, BLOCK_H=block, **config,
        )  # fmt: skip

    candidates = [{"num_warps": w} for w in (4, 8, 1, 2, 16)]
    launch(
        _tune(
            "rms_norm",
            x.device,
            (x.dtype, hidden, residual is not None, bucket(x2.shape[0])),
            candidates,
            launch,
        )
    )
    return out.view(x.shape), res_out.view(x.shape)


def rms_norm(x, weight, eps):
    return _norm(x, None, weight, eps)[0]


def fused_add_rms_norm(x, residual, weight, eps):
    return _norm(x, residual, weight, eps)


def _norm_shape(x, *rest) -> str | None:
    if x.shape[-1] > MAX_HIDDEN:
        return f"hidden size {x.shape[-1]} > {MAX_HIDDEN}"
    return _bf16_reason(x)


def silu_and_mul(x):
    tk = _kernels()
    width = x.shape[-1]
    inter = width // 2
    x2 = _last_dim_contiguous(x.reshape(-1, width))
    out = torch.empty((x2.shape[0], inter), dtype=x.dtype, device=x.device)
    block = min(1024, _p2(inter))
    tk.silu_and_mul_kernel[(x2.shape[0], -(-inter // block))](
        x2, out, inter, x2.stride(0), out.stride(0), BLOCK=block
    )
    return out.view(*x.shape[:-1], inter)


def _rotate(tk, x, positions, cache, is_neox):
    half = cache.shape[-1] // 2
    out = x.clone() if 2 * half < x.shape[-1] else torch.empty_like(x)
    heads = x.shape[1]
    block_h = min(16, _p2(heads))
    tk.rotary_kernel[(x.shape[0], -(-heads // block_h))](
        x, out, positions, cache, heads, half,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), cache.stride(0),
        IS_NEOX=is_neox, BLOCK_H=block_h, BLOCK_R=_p2(half),
    )  # fmt: skip
    return out


def apply_rotary(q, k, positions, cos_sin_cache, is_neox=True):
    tk = _kernels()
    cache = cos_sin_cache.contiguous()
    positions = positions.contiguous()
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    return _rotate(tk, q, positions, cache, is_neox), _rotate(tk, k, positions, cache, is_neox)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    tk = _kernels()
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    heads, dim = k.shape[1], k.shape[2]
    tk.write_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slot_mapping.contiguous(), heads, dim, k_cache.shape[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_H=_p2(heads), BLOCK_D=_p2(dim),
    )  # fmt: skip


def _cache_reason(k_cache, *rest) -> str | None:
    if k_cache.stride(-1) != 1:
        return "KV cache head dim must be contiguous"
    return _bf16_reason(k_cache)


def _attention_reason(q, k_cache, *rest) -> str | None:
    if q.dtype != k_cache.dtype:
        return f"q dtype {q.dtype} differs from KV cache dtype {k_cache.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if k_cache.stride(-1) != 1:
        return "KV cache head dim must be contiguous"
    return _bf16_reason(q)


def _dot_settings(dtype: torch.dtype) -> tuple[bool, str]:
    """(compute in fp32, tl.dot input precision): fp32 inputs use exact fp32 dots, not tf32."""
    compute_f32 = _kernels().interpreting() or dtype == torch.float32
    return compute_f32, "ieee" if compute_f32 else "tf32"


# Shared memory a paged attention launch needs, in bytes: the query (or head-group) tile plus one
# K and one V tile, each BLOCK_D wide in the dot dtype (fp32 when COMPUTE_F32), plus, on NVIDIA,
# the fp32 score tile staged for the second dot. An upper bound of what Triton 3.x allocates,
# checked against the real compiler for sm_90, sm_89 and gfx942 (tests/kernels/test_triton_compile.py).
SMEM_MARGIN = 1024


def attention_shared_bytes(
    rows: int, block_n: int, block_d: int, dtype: torch.dtype, target: str | None, compute_f32: bool
) -> int:
    """Estimated shared memory of one decode (rows = BLOCK_G) or prefill (rows = BLOCK_M) block."""
    element = 4 if compute_f32 or dtype == torch.float32 else 2
    scores = rows * block_n * 4 if not (target or "").startswith("gfx") else 0
    return (rows + 2 * block_n) * block_d * element + scores + SMEM_MARGIN


def fitting(candidates: list[Config], limit: int, estimate) -> list[Config]:
    """The candidates whose estimated shared memory fits ``limit`` (order kept); at least the smallest."""
    kept = [c for c in candidates if estimate(c) <= limit]
    return kept or [min(candidates, key=estimate)]


def decode_candidates(
    dtype: torch.dtype, group: int, dim: int, target: str | None, limit: int, split_options: list[int],
    heuristic_splits: int, compute_f32: bool,
) -> list[Config]:  # fmt: skip
    """Decode launch configs for a target, heuristic first, every one within its shared memory."""
    candidates = [
        {"BLOCK_N": n, "num_warps": w, "splits": s}
        for n in (32, 64, 128, 16)
        for w in (4, 8)
        for s in split_options
    ]
    candidates.sort(key=lambda c: (c["splits"] != heuristic_splits, c["BLOCK_N"] != 32, c["num_warps"] != 4))
    block_g, block_d = max(16, _p2(group)), max(16, _p2(dim))
    return fitting(
        candidates,
        limit,
        lambda c: attention_shared_bytes(block_g, c["BLOCK_N"], block_d, dtype, target, compute_f32),
    )


def prefill_candidates(
    dtype: torch.dtype, dim: int, target: str | None, limit: int, compute_f32: bool
) -> list[Config]:
    """Prefill launch configs for a target, preferred first, every one within its shared memory."""
    candidates = [
        {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}
        for m, n in ((64, 64), (128, 64), (64, 32), (32, 64), (32, 32), (16, 16))
        for w in (4, 8)
        for s in (2, 3)
    ]
    block_d = max(16, _p2(dim))
    return fitting(
        candidates,
        limit,
        lambda c: attention_shared_bytes(c["BLOCK_M"], c["BLOCK_N"], block_d, dtype, target, compute_f32),
    )


def _target(device: torch.device) -> tuple[str | None, int]:
    """(compile target, shared memory per block) of a GPU; the interpreter has no limit."""
    if device.type == "cpu":
        return None, 1 << 30
    info = detect_device(device)
    return info.target, info.shared_memory_bytes or shared_memory_limit(info.target)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def paged_decode_attention(q, k_cache, v_cache, context_lens, block_tables, scale):
    tk = _kernels()
    q = _last_dim_contiguous(q)
    n_seqs, q_heads, dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    out = torch.empty_like(q)
    compute_f32, precision = _dot_settings(q.dtype)
    max_tokens = block_tables.shape[1] * block_size
    if FORCED_DECODE_SPLITS is not None:
        heuristic_splits = FORCED_DECODE_SPLITS
    else:
        wanted = -(-2 * _sm_count(q.device) // max(1, n_seqs * kv_heads))
        heuristic_splits = max(1, min(_p2(wanted), max_tokens // 256, 64))
    tables = block_tables.contiguous()
    lens = context_lens.contiguous()

    def launch(config: Config) -> None:
        splits = config["splits"]
        block_n = config["BLOCK_N"]
        tokens_per_split = _cdiv(_cdiv(max_tokens, splits), block_n) * block_n
        if splits > 1:
            part_m = torch.empty((n_seqs, q_heads, splits), dtype=torch.float32, device=q.device)
            part_l = torch.empty_like(part_m)
            part_acc = torch.empty((n_seqs, q_heads, splits, dim), dtype=torch.float32, device=q.device)
        else:
            part_m = part_l = part_acc = out
        tk.paged_decode_kernel[(n_seqs, kv_heads, splits)](
            q, k_cache, v_cache, tables, lens, out, part_m, part_l, part_acc,
            scale, group, q_heads, dim, block_size, tokens_per_split,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            tables.stride(0), out.stride(0), out.stride(1),
            NUM_SPLITS=splits, COMPUTE_F32=compute_f32, PRECISION=precision,
            BLOCK_G=max(16, _p2(group)), BLOCK_N=block_n, BLOCK_D=max(16, _p2(dim)),
            num_warps=config["num_warps"],
        )  # fmt: skip
        if splits > 1:
            tk.decode_reduce_kernel[(n_seqs, q_heads)](
                part_m, part_l, part_acc, out, q_heads, dim, out.stride(0), out.stride(1),
                NUM_SPLITS=splits, BLOCK_S=_p2(splits), BLOCK_D=_p2(dim),
            )  # fmt: skip

    split_options = sorted({heuristic_splits, max(1, heuristic_splits // 2), min(64, heuristic_splits * 2)})
    if FORCED_DECODE_SPLITS is not None:
        split_options = [FORCED_DECODE_SPLITS]
    target, limit = _target(q.device)
    candidates = decode_candidates(
        q.dtype, group, dim, target, limit, split_options, heuristic_splits, compute_f32
    )
    shape_bucket = (
        q.dtype,
        q_heads,
        kv_heads,
        dim,
        block_size,
        bucket(n_seqs),
        bucket(block_tables.shape[1]),
    )
    launch(_tune("paged_decode", q.device, shape_bucket, candidates, launch))
    return out


def paged_prefill_attention(
    q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_q_len=None
):
    tk = _kernels()
    q = _last_dim_contiguous(q)
    total, q_heads, dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    compute_f32, precision = _dot_settings(q.dtype)
    cu = cu_seqlens_q.contiguous()
    if max_q_len is None:  # a device sync: callers that know it on the host pass it
        max_q_len = int((cu[1:] - cu[:-1]).max())
    tables = block_tables.contiguous()
    lens = context_lens.contiguous()
    n_seqs = lens.shape[0]

    def launch(config: Config) -> None:
        block_m = config["BLOCK_M"]
        tk.paged_prefill_kernel[(n_seqs, -(-max_q_len // block_m), q_heads)](
            q, k_cache, v_cache, tables, lens, cu, out,
            scale, q_heads // kv_heads, dim, block_size,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            tables.stride(0), out.stride(0), out.stride(1),
            COMPUTE_F32=compute_f32, PRECISION=precision,
            BLOCK_M=block_m, BLOCK_N=config["BLOCK_N"], BLOCK_D=max(16, _p2(dim)),
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )  # fmt: skip

    if tk.interpreting():
        candidates = [{"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}]
    else:
        target, limit = _target(q.device)
        candidates = prefill_candidates(q.dtype, dim, target, limit, compute_f32)
    shape_bucket = (q.dtype, q_heads, kv_heads, dim, block_size, bucket(total), bucket(max_q_len))
    launch(_tune("paged_prefill", q.device, shape_bucket, candidates, launch))
    return out


def register_all() -> None:
    def add(op, fn, shape_check):
        register(op, "triton", fn, TRITON_DEVICES, FLOAT_DTYPES, shape_check, triton_available)

    add("rms_norm", rms_norm, _norm_shape)
    add("fused_add_rms_norm", fused_add_rms_norm, _norm_shape)
    add("silu_and_mul", silu_and_mul, lambda x: _bf16_reason(x))
    add("apply_rotary", apply_rotary, lambda q, *rest: _bf16_reason(q))
    add("write_kv_cache", write_kv_cache, lambda k, v, k_cache, *rest: _cache_reason(k_cache))
    add("paged_decode_attention", paged_decode_attention, _attention_reason)
    add("paged_prefill_attention", paged_prefill_attention, _attention_reason)
