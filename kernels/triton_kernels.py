"""Triton kernels, written once for CUDA, ROCm and XPU (and runnable by Triton's CPU interpreter).

Each kernel is a plain function wrapped by `kernel`, which builds a compiled JITFunction or an
InterpretedFunction on first launch depending on TRITON_INTERPRET at that moment, so importing
this module before or after a test sets the variable makes no difference.

Conventions: loads are upcast to fp32 right away when COMPUTE_F32 is set (always under the
interpreter, whose bf16 arithmetic is wrong; and for fp32 inputs); on GPUs half-precision tiles
stay half for tl.dot so tensor cores are used, with fp32 accumulation. All softmax math is fp32.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

NEG_INIT: tl.constexpr = tl.constexpr(-1.0e30)
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class kernel:  # noqa: N801  (used as a decorator, like triton.jit)
    """Lazily jit or interpret a kernel function, chosen at launch time."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self._built: dict[bool, object] = {}

    def _get(self):
        interpret = interpreting()
        built = self._built.get(interpret)
        if built is None:
            if interpret:
                from triton.runtime.interpreter import InterpretedFunction

                built = InterpretedFunction(self.fn)
            else:
                built = JITFunction(self.fn)
            self._built[interpret] = built
        return built

    def __getitem__(self, grid):
        return self._get()[grid]


@kernel
def rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    hidden,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        summed = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    mean_square = tl.sum(x * x, axis=0) / hidden
    inv_rms = 1.0 / tl.sqrt(mean_square + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (x * inv_rms * w).to(out_ptr.dtype.element_ty), mask=mask)


@kernel
def silu_and_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    a = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    out = a / (1.0 + tl.exp(-a)) * b
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@kernel
def rotary_kernel(
    x_ptr,
    out_ptr,
    pos_ptr,
    cache_ptr,
    n_heads,
    half,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    stride_c,
    IS_NEOX: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_R)
    imask = i < half
    pos = tl.load(pos_ptr + token).to(tl.int64)
    cos = tl.load(cache_ptr + pos * stride_c + i, mask=imask, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_c + half + i, mask=imask, other=0.0).to(tl.float32)
    if IS_NEOX:
        first = i
        second = i + half
    else:
        first = 2 * i
        second = 2 * i + 1
    mask = (heads[:, None] < n_heads) & imask[None, :]
    src = x_ptr + token * stride_xt + heads[:, None] * stride_xh
    dst = out_ptr + token * stride_ot + heads[:, None] * stride_oh
    x1 = tl.load(src + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + second[None, :], mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * cos[None, :] - x2 * sin[None, :]
    y2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(dst + first[None, :], y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + second[None, :], y2.to(out_ptr.dtype.element_ty), mask=mask)


@kernel
def write_kv_kernel(
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    n_heads,
    head_dim,
    block_size,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kco,
    stride_kch,
    stride_vcb,
    stride_vco,
    stride_vch,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < n_heads) & (dims[None, :] < head_dim) & (slot >= 0)
    block = slot // block_size
    offset = slot % block_size
    k = tl.load(k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    k_dst = kc_ptr + block * stride_kcb + offset * stride_kco + heads[:, None] * stride_kch + dims[None, :]
    v_dst = vc_ptr + block * stride_vcb + offset * stride_vco + heads[:, None] * stride_vch + dims[None, :]
    tl.store(k_dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


@kernel
def paged_decode_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    tables_ptr,
    lens_ptr,
    out_ptr,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    scale,
    group,
    q_heads,
    head_dim,
    block_size,
    tokens_per_split,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ko,
    stride_kh,
    stride_vb,
    stride_vo,
    stride_vh,
    stride_tb,
    stride_ob,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    COMPUTE_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program = one sequence x one KV head x one split of the context (flash-decoding)."""
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context = tl.load(lens_ptr + seq)
    qk_scale = scale * LOG2E  # softmax in base 2: exp2 is the native instruction
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * group + g
    gmask = g < group
    dmask = d < head_dim
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=gmask[:, None] & dmask[None, :],
        other=0.0,
    )
    if COMPUTE_F32:
        q = q.to(tl.float32)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, context)
    m_i = tl.full([BLOCK_G], NEG_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pmask = pos < end
        block = tl.load(tables_ptr + seq * stride_tb + pos // block_size, mask=pmask, other=0).to(tl.int64)
        offset = pos % block_size
        kv_mask = pmask[:, None] & dmask[None, :]
        k = tl.load(
            kc_ptr
            + block[:, None] * stride_kb
            + offset[:, None] * stride_ko
            + kv_head * stride_kh
            + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            vc_ptr
            + block[:, None] * stride_vb
            + offset[:, None] * stride_vo
            + kv_head * stride_vh
            + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if COMPUTE_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        scores = tl.where(pmask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        dst = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])
    else:
        row = (seq * q_heads + heads) * NUM_SPLITS + split
        tl.store(part_m_ptr + row, m_i, mask=gmask)
        tl.store(part_l_ptr + row, l_i, mask=gmask)
        tl.store(
            part_acc_ptr + row[:, None] * head_dim + d[None, :], acc, mask=gmask[:, None] & dmask[None, :]
        )


@kernel
def decode_reduce_kernel(
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    out_ptr,
    q_heads,
    head_dim,
    stride_ob,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Merge the per-split softmax partials of one (sequence, query head)."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < NUM_SPLITS
    rows = (seq * q_heads + head) * NUM_SPLITS + s
    m = tl.load(part_m_ptr + rows, mask=smask, other=NEG_INIT)
    l = tl.load(part_l_ptr + rows, mask=smask, other=0.0)  # noqa: E741
    acc = tl.load(
        part_acc_ptr + rows[:, None] * head_dim + d[None, :],
        mask=smask[:, None] & (d[None, :] < head_dim),
        other=0.0,
    )
    m_max = tl.max(m, axis=0)
    weight = tl.exp2(m - m_max)  # partial maxima are in log2 units
    out = tl.sum(weight[:, None] * acc, axis=0) / tl.sum(weight * l, axis=0)
    tl.store(
        out_ptr + seq * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < head_dim
    )


@kernel
def paged_prefill_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    tables_ptr,
    lens_ptr,
    cu_ptr,
    out_ptr,
    scale,
    group,
    head_dim,
    block_size,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ko,
    stride_kh,
    stride_vb,
    stride_vo,
    stride_vh,
    stride_tb,
    stride_ot,
    stride_oh,
    COMPUTE_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program = one tile of BLOCK_M queries of one sequence x one query head (flash attention)."""
    seq = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_ptr + seq).to(tl.int64)
    q_len = tl.load(cu_ptr + seq + 1).to(tl.int64) - q_start
    if tile * BLOCK_M < q_len:
        kv_head = head // group
        qk_scale = scale * LOG2E
        context = tl.load(lens_ptr + seq).to(tl.int64)
        first_pos = context - q_len
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < q_len
        q_pos = first_pos + rows
        d = tl.arange(0, BLOCK_D)
        dmask = d < head_dim
        q_mask = rmask[:, None] & dmask[None, :]
        q = tl.load(
            q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh + d[None, :],
            mask=q_mask,
            other=0.0,
        )
        if COMPUTE_F32:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], NEG_INIT, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        kv_end = tl.minimum(context, first_pos + (tile + 1) * BLOCK_M)
        for n0 in range(0, kv_end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            pmask = pos < kv_end
            block = tl.load(tables_ptr + seq * stride_tb + pos // block_size, mask=pmask, other=0).to(
                tl.int64
            )
            offset = pos % block_size
            kv_mask = pmask[:, None] & dmask[None, :]
            k = tl.load(
                kc_ptr
                + block[:, None] * stride_kb
                + offset[:, None] * stride_ko
                + kv_head * stride_kh
                + d[None, :],
                mask=kv_mask,
                other=0.0,
            )
            v = tl.load(
                vc_ptr
                + block[:, None] * stride_vb
                + offset[:, None] * stride_vo
                + kv_head * stride_vh
                + d[None, :],
                mask=kv_mask,
                other=0.0,
            )
            if COMPUTE_F32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            visible = (pos[None, :] <= q_pos[:, None]) & pmask[None, :]
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = acc / l_i[:, None]
        dst = out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=q_mask)


next_power_of_2 = triton.next_power_of_2
