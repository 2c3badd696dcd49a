"""The `torch` backend: vectorized native torch that runs on every torch device.

Decode attention gathers each sequence's blocks with index_select and runs SDPA. On CPU the rows
are sorted by length and cut into chunks of about CPU_DECODE_CHUNK_BYTES of gathered KV, written
into a reused per-thread buffer: the gathered copy is still in cache when SDPA reads it, so the
paging costs little over SDPA on contiguous KV. GQA decode folds the query heads of one KV head
into SDPA's query-length axis, so KV is never repeated.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from tusk.kernels.sampling_torch import sample  # noqa: F401  (the torch backend's sampler)

_HALF = (torch.float16, torch.bfloat16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    residual_out = x + residual if x.dtype == residual.dtype else (x.float() + residual.float()).to(x.dtype)
    return rms_norm(residual_out, weight, eps), residual_out


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    half = cos_sin_cache.shape[-1] // 2
    entries = cos_sin_cache.index_select(0, positions.long()).float()
    cos = entries[:, None, :half]
    sin = entries[:, None, half:]
    return _rotate(q, cos, sin, is_neox), _rotate(k, cos, sin, is_neox)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    rot = 2 * cos.shape[-1]
    xf = x.float()
    out = xf.clone() if rot < x.shape[-1] else torch.empty_like(xf)
    if is_neox:
        x1, x2 = xf[..., : rot // 2], xf[..., rot // 2 : rot]
        torch.addcmul(x1 * cos, x2, sin, value=-1.0, out=out[..., : rot // 2])
        torch.addcmul(x2 * cos, x1, sin, out=out[..., rot // 2 : rot])
    else:
        x1, x2 = xf[..., 0:rot:2], xf[..., 1:rot:2]
        out[..., 0:rot:2] = torch.addcmul(x1 * cos, x2, sin, value=-1.0)
        out[..., 1:rot:2] = torch.addcmul(x2 * cos, x1, sin)
    return out.to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    inter = x.shape[-1] // 2
    if x.dtype in _HALF:
        xf = x.float()
        return (F.silu(xf[..., :inter]) * xf[..., inter:]).to(x.dtype)
    return F.silu(x[..., :inter]) * x[..., inter:]


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    block_size = k_cache.shape[1]
    slots = slot_mapping.long()
    valid = slots >= 0
    if not bool(valid.all()):
        slots, k, v = slots[valid], k[valid], v[valid]
    blocks = torch.div(slots, block_size, rounding_mode="floor")
    offsets = slots - blocks * block_size
    k_cache.index_put_((blocks, offsets), k.to(k_cache.dtype))
    v_cache.index_put_((blocks, offsets), v.to(v_cache.dtype))


def _gather_sequences(
    cache: torch.Tensor, tables: torch.Tensor, workspace: str | None = None
) -> torch.Tensor:
    """[b, n_blocks] block ids -> [b, Hkv, n_blocks*bs, D] (one copy, strided view for SDPA).

    With a workspace name the copy lands in a reused per-thread buffer (CPU: no page faults).
    """
    b, n_blocks = tables.shape
    _, block_size, heads, dim = cache.shape
    ids = tables.reshape(-1).long()
    if workspace is None:
        flat = cache.index_select(0, ids)
    else:
        target = _buffer(workspace, ids.numel() * block_size * heads * dim, cache.dtype, cache.device)
        flat = torch.index_select(cache, 0, ids, out=target.view(ids.numel(), block_size, heads, dim))
    return flat.view(b, n_blocks * block_size, heads, dim).transpose(1, 2)


# Gathered K (and V) per CPU decode chunk: small enough to stay in cache while SDPA reads it.
CPU_DECODE_CHUNK_BYTES = 2 << 20
# Larger gathers (long-context prefill) allocate per call instead of pinning memory per thread.
WORKSPACE_MAX_BYTES = 128 << 20

_workspace = threading.local()


def _buffer(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread scratch buffer reused across calls: no allocation (and page faults) per step."""
    if numel * torch.empty(0, dtype=dtype).element_size() > WORKSPACE_MAX_BYTES:
        return torch.empty(numel, dtype=dtype, device=device)  # too big to keep around
    buffers = _workspace.__dict__.setdefault("buffers", {})
    key = (name, dtype, device)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        buffers[key] = buf
    return buf[:numel]


def _decode_group(
    q, k_cache, v_cache, tables, lens, scale, use_workspace: bool, masked: bool
) -> torch.Tensor:
    """Decode rows whose KV fits `tables` [b, n_blocks]: gather, then one SDPA call."""
    b = tables.shape[0]
    kv_heads, dim = k_cache.shape[2], k_cache.shape[3]
    q_heads = q.shape[1]
    keys = _gather_sequences(k_cache, tables, "k" if use_workspace else None).to(q.dtype)
    values = _gather_sequences(v_cache, tables, "v" if use_workspace else None).to(q.dtype)
    mask = None
    if masked:
        positions = torch.arange(keys.shape[2], device=q.device)
        mask = (positions[None, :] < lens[:, None])[:, None, None, :]
    # [b, Hq, D] -> [b, Hkv, group, D]: a KV head's query heads become SDPA's query axis.
    grouped_q = q.reshape(b, kv_heads, q_heads // kv_heads, dim)
    attended = F.scaled_dot_product_attention(grouped_q, keys, values, attn_mask=mask, scale=scale)
    return attended.reshape(b, q_heads, dim)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    n_seqs = q.shape[0]
    if n_seqs == 0:
        return torch.empty_like(q)
    if q.device.type != "cpu":
        # No host sync on accelerators: one padded batch over the full table width.
        return _decode_group(q, k_cache, v_cache, block_tables, context_lens.long(), scale, False, True)
    # CPU: sort rows by length and cut them into chunks whose gathered KV stays cache-resident,
    # each padded only to its own longest row.
    block_size = k_cache.shape[1]
    token_bytes = k_cache.shape[2] * k_cache.shape[3] * k_cache.element_size()
    lens = context_lens.tolist()
    order = sorted(range(n_seqs), key=lens.__getitem__)
    out = torch.empty_like(q)
    start = 0
    while start < n_seqs:
        stop = start + 1
        while stop < n_seqs:
            padded = -(-lens[order[stop]] // block_size) * block_size
            if (stop + 1 - start) * padded * token_bytes > CPU_DECODE_CHUNK_BYTES:
                break
            stop += 1
        rows = order[start:stop]
        n_blocks = -(-lens[rows[-1]] // block_size)
        masked = lens[rows[0]] != n_blocks * block_size
        if rows == list(range(rows[0], rows[0] + len(rows))):
            first, last = rows[0], rows[-1] + 1
            out[first:last] = _decode_group(
                q[first:last], k_cache, v_cache, block_tables[first:last, :n_blocks],
                context_lens[first:last].long(), scale, True, masked,
            )  # fmt: skip
        else:
            index = torch.tensor(rows, device=q.device)
            attended = _decode_group(
                q.index_select(0, index), k_cache, v_cache, block_tables.index_select(0, index)[:, :n_blocks],
                context_lens.index_select(0, index).long(), scale, True, masked,
            )  # fmt: skip
            out.index_copy_(0, index, attended)
        start = stop
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_q_len: int | None = None,  # a launch-size hint for GPU backends; this path reads the lists
) -> torch.Tensor:
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    cu = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    for b, context_len in enumerate(lens):
        start, end = cu[b], cu[b + 1]
        q_len = end - start
        if q_len == 0:
            continue
        n_blocks = -(-context_len // block_size)
        tables = block_tables[b : b + 1, :n_blocks]
        on_cpu = q.device.type == "cpu"
        keys = _gather_sequences(k_cache, tables, "k" if on_cpu else None)[:, :, :context_len].to(q.dtype)
        values = _gather_sequences(v_cache, tables, "v" if on_cpu else None)[:, :, :context_len].to(q.dtype)
        seq_q = q[start:end].transpose(0, 1).unsqueeze(0)
        if q_len == context_len:
            attended = F.scaled_dot_product_attention(
                seq_q, keys, values, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            q_pos = torch.arange(context_len - q_len, context_len, device=q.device)
            mask = torch.arange(context_len, device=q.device)[None, :] <= q_pos[:, None]
            attended = F.scaled_dot_product_attention(
                seq_q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
            )
        out[start:end] = attended[0].transpose(0, 1)
    return out


def gather_kv_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    layers, two, n_blocks = kv_cache.shape[:3]
    if kv_cache.is_contiguous():
        # index_select on the block axis of a [N, L*2, X] view writes the output layout in one pass
        by_block = kv_cache.view(layers * two, n_blocks, -1).transpose(0, 1)
        picked = by_block.index_select(0, block_ids.long())
        return picked.view(block_ids.shape[0], layers, two, *kv_cache.shape[3:])
    return kv_cache.index_select(2, block_ids.long()).permute(2, 0, 1, 3, 4, 5).contiguous()


def scatter_kv_blocks(blocks: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    layers, two, n_blocks = kv_cache.shape[:3]
    source = blocks.to(kv_cache.dtype)
    if kv_cache.is_contiguous() and source.is_contiguous():
        # mirror of gather: copy whole [L*2, X] rows along the block axis of a strided view
        by_block = kv_cache.view(layers * two, n_blocks, -1).transpose(0, 1)
        by_block.index_copy_(0, block_ids.long(), source.view(block_ids.shape[0], layers * two, -1))
        return
    kv_cache.index_copy_(2, block_ids.long(), source.permute(1, 2, 0, 3, 4, 5))
