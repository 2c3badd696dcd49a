"""The Llama family (Llama 1/2/3, Mistral, Qwen2) over a paged KV cache.

One forward pass serves a mixed batch: the first ``num_decodes`` tokens are single-token decodes
(one per sequence), the rest are prefill chunks laid end to end. Projections and MLPs run over
all tokens at once; only attention splits, because decode and chunked-prefill attention read the
paged cache differently. All math except the projections goes through ``tusk.kernels`` so a
backend (torch, Triton) can replace it per device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import tusk.kernels as K
from tusk.worker.loader import ModelLoadError, ModelSpec


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of every token (-1 = do not write)
    num_decodes: int
    decode_context_lens: torch.Tensor | None  # [Bd] int32
    decode_block_tables: torch.Tensor | None  # [Bd, max_blocks] int32
    prefill_cu_seqlens: torch.Tensor | None  # [Bp + 1] int32
    prefill_context_lens: torch.Tensor | None  # [Bp] int32
    prefill_block_tables: torch.Tensor | None  # [Bp, max_blocks] int32


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # q, k and v projections stacked: one matmul instead of three
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # gate and up stacked, as silu_and_mul expects
    down: torch.Tensor


class LlamaModel:
    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], max_position: int) -> None:
        self.spec = spec
        self.q_size = spec.num_heads * spec.head_dim
        self.kv_size = spec.num_kv_heads * spec.head_dim
        self.scale = spec.head_dim**-0.5

        def take(name: str) -> torch.Tensor:
            try:
                return weights.pop(name)
            except KeyError:
                raise ModelLoadError(f"checkpoint lacks tensor {name!r}") from None

        self.embed = take("model.embed_tokens.weight")
        self.layers: list[_Layer] = []
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            qkv = torch.cat([take(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
            bias = None
            if spec.qkv_bias:
                bias = torch.cat([take(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
            self.layers.append(
                _Layer(
                    input_norm=take(p + "input_layernorm.weight"),
                    qkv=qkv,
                    qkv_bias=bias,
                    o=take(p + "self_attn.o_proj.weight"),
                    post_norm=take(p + "post_attention_layernorm.weight"),
                    gate_up=torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]),
                    down=take(p + "mlp.down_proj.weight"),
                )
            )
        self._views_of: torch.Tensor | None = None
        self._views: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.norm = take("model.norm.weight")
        lm_head = weights.pop("lm_head.weight", None)
        self.lm_head = self.embed if spec.tie_word_embeddings or lm_head is None else lm_head
        self.cos_sin = K.rope_cos_sin_cache(
            spec.head_dim,
            max_position,
            spec.rope_theta,
            spec.rope_scaling,
            torch.float32,
            self.embed.device,
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (float32) of the tokens at ``logits_indices``; KV of every token goes to the cache."""
        spec = self.spec
        t = input_ids.shape[0]
        caches = self._layer_caches(kv_cache)
        hidden = F.embedding(input_ids, self.embed)
        residual: torch.Tensor | None = None
        for layer, (k_cache, v_cache) in zip(self.layers, caches, strict=True):
            if residual is None:
                residual = hidden
                x = K.rms_norm(hidden, layer.input_norm, spec.rms_norm_eps)
            else:
                x, residual = K.fused_add_rms_norm(hidden, residual, layer.input_norm, spec.rms_norm_eps)
            qkv = F.linear(x, layer.qkv, layer.qkv_bias)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.reshape(t, spec.num_heads, spec.head_dim)
            k = k.reshape(t, spec.num_kv_heads, spec.head_dim)
            v = v.reshape(t, spec.num_kv_heads, spec.head_dim)
            q, k = K.apply_rotary(q, k, positions, self.cos_sin, True)
            K.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
            attn = self._attention(q, k_cache, v_cache, meta)
            hidden = F.linear(attn.reshape(t, self.q_size), layer.o)
            x, residual = K.fused_add_rms_norm(hidden, residual, layer.post_norm, spec.rms_norm_eps)
            hidden = F.linear(K.silu_and_mul(F.linear(x, layer.gate_up)), layer.down)
        assert residual is not None
        if logits_indices.shape[0] != t:  # only the rows that sample go through the norm and head
            hidden = hidden.index_select(0, logits_indices)
            residual = residual.index_select(0, logits_indices)
        x, _ = K.fused_add_rms_norm(hidden, residual, self.norm, spec.rms_norm_eps)
        return F.linear(x, self.lm_head).float()

    def _layer_caches(self, kv_cache: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (k_cache, v_cache) views, made once per cache tensor rather than every step."""
        if self._views_of is not kv_cache:
            self._views = [(kv_cache[i, 0], kv_cache[i, 1]) for i in range(kv_cache.shape[0])]
            self._views_of = kv_cache
        return self._views

    def _attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        nd = meta.num_decodes
        parts = []
        if nd:
            parts.append(
                K.paged_decode_attention(
                    q[:nd], k_cache, v_cache, meta.decode_context_lens, meta.decode_block_tables, self.scale
                )
            )
        if nd < q.shape[0]:
            parts.append(
                K.paged_prefill_attention(
                    q[nd:],
                    k_cache,
                    v_cache,
                    meta.prefill_cu_seqlens,
                    meta.prefill_context_lens,
                    meta.prefill_block_tables,
                    self.scale,
                )
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts)
