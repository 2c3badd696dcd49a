"""Decoder-only transformers of the Llama lineage over a paged KV cache: Llama 1/2/3, Mistral,
Qwen2, Qwen3, Phi-3 and Gemma 3, which differ only in details the ``ModelSpec`` names (biases,
q/k norms, sliding windows, Gemma's norm placement and scaling, fused checkpoint tensors).

One forward pass serves a mixed batch: the first ``num_decodes`` tokens are single-token decodes
(one per sequence), the rest are prefill chunks laid end to end. Projections and MLPs run over
all tokens at once; only attention splits, because decode and chunked-prefill attention read the
paged cache differently. All math except the projections goes through ``tusk.kernels`` so a
backend (torch, Triton) can replace it per device; sliding-window layers whose context exceeds the
window use ``attention.windowed_attention``.

Loading is strict: a tensor the model needs that the checkpoint lacks, or a checkpoint tensor the
model does not use, is a ``ModelLoadError`` naming them, never a silently different model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import tusk.kernels as K
from tusk.worker.loader import ModelLoadError, ModelSpec
from tusk.worker.models.attention import windowed_attention
from tusk.worker.models.rope import cos_sin_cache


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of every token (-1 = do not write)
    num_decodes: int
    decode_context_lens: torch.Tensor | None  # [Bd] int32
    decode_block_tables: torch.Tensor | None  # [Bd, max_blocks] int32
    prefill_cu_seqlens: torch.Tensor | None  # [Bp + 1] int32
    prefill_context_lens: torch.Tensor | None  # [Bp] int32
    prefill_block_tables: torch.Tensor | None  # [Bp, max_blocks] int32
    prefill_max_q_len: int | None = None  # longest prefill chunk, known on the host (no device sync)


@dataclass
class _Experts:
    """A mixture-of-experts block: a router picks ``top_k`` of the experts for each token."""

    router: torch.Tensor  # [E, H]
    gate_up: torch.Tensor  # [E, 2I, H]
    down: torch.Tensor  # [E, H, I]
    top_k: int
    renormalize: bool


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # q, k and v projections stacked: one matmul instead of three
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor  # Llama: before the MLP; Gemma: on the attention output
    gate_up: torch.Tensor  # gate and up stacked, as silu_and_mul expects
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    pre_ff_norm: torch.Tensor | None = None  # Gemma only
    post_ff_norm: torch.Tensor | None = None  # Gemma only
    window: int | None = None
    rope: int = 0  # index into LlamaModel.cos_sin
    experts: _Experts | None = None  # set instead of gate_up/down on MoE layers


class _Weights:
    """Takes tensors out of the checkpoint by name, remembering what was missing."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self.weights = weights
        self.missing: list[str] = []

    def take(self, name: str) -> torch.Tensor:
        tensor = self.weights.pop(name, None)
        if tensor is None:
            self.missing.append(name)
            return torch.empty(0)
        return tensor

    def take_cat(self, names: list[str]) -> torch.Tensor:
        return torch.cat([self.take(n) for n in names])

    def finish(self, architecture: str) -> None:
        def listing(names: list[str]) -> str:
            shown = ", ".join(sorted(names)[:6])
            return shown + (f" and {len(names) - 6} more" if len(names) > 6 else "")

        if self.missing:
            raise ModelLoadError(f"checkpoint lacks tensors {architecture} needs: {listing(self.missing)}")
        if self.weights:
            raise ModelLoadError(
                f"checkpoint has tensors {architecture} does not use: {listing(list(self.weights))} "
                "(a different architecture or config?)"
            )


class LlamaModel:
    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], max_position: int) -> None:
        self.spec = spec
        self.q_size = spec.num_heads * spec.head_dim
        self.kv_size = spec.num_kv_heads * spec.head_dim
        self.scale = spec.attention_scale or spec.head_dim**-0.5
        w = _Weights(weights)
        self.embed = w.take("model.embed_tokens.weight")
        self.layers = [self._layer(spec, w, i) for i in range(spec.num_layers)]
        self.norm = self._norm(w.take("model.norm.weight"))
        lm_head = weights.pop("lm_head.weight", None)  # tied checkpoints may still carry a copy
        if spec.tie_word_embeddings:
            self.lm_head = self.embed
        elif lm_head is None:
            w.missing.append("lm_head.weight")
        else:
            self.lm_head = lm_head
        w.finish(spec.architecture)
        self._check_shapes()
        self._views_of: torch.Tensor | None = None
        self._views: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.embed_scale = (
            torch.tensor(spec.hidden_size**0.5, dtype=torch.float32).to(self.embed.dtype).item()
            if spec.gemma
            else None
        )
        device = self.embed.device
        self.cos_sin = [
            cos_sin_cache(
                spec.rope_scaling,
                spec.rope_theta,
                spec.head_dim,
                spec.max_position_embeddings,
                max_position,
                device,
            )
        ]
        if spec.local_rope_theta is not None:
            self.cos_sin.append(
                cos_sin_cache(
                    None,
                    spec.local_rope_theta,
                    spec.head_dim,
                    spec.max_position_embeddings,
                    max_position,
                    device,
                )
            )
        self.has_windows = any(layer.window for layer in self.layers)
        # Kernel ops bound to their backends once for this model; checked only in debug mode.
        self.ops = K.bind()

    def _check_shapes(self) -> None:
        """Every tensor has the shape config.json implies; otherwise a load error, not a failed step."""
        spec = self.spec
        h, d, inter = spec.hidden_size, spec.head_dim, spec.intermediate_size
        expected: list[tuple[str, torch.Tensor | None, tuple[int, ...]]] = [
            ("model.embed_tokens.weight", self.embed, (spec.vocab_size, h)),
            ("lm_head.weight", self.lm_head, (spec.vocab_size, h)),
            ("model.norm.weight", self.norm, (h,)),
        ]
        qkv_rows = (spec.num_heads + 2 * spec.num_kv_heads) * d
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            expected += [
                (p + "input_layernorm.weight", layer.input_norm, (h,)),
                (p + "self_attn.q/k/v_proj.weight", layer.qkv, (qkv_rows, h)),
                (p + "self_attn.q/k/v_proj.bias", layer.qkv_bias, (qkv_rows,)),
                (p + "self_attn.o_proj.weight", layer.o, (h, spec.num_heads * d)),
                (p + "self_attn.o_proj.bias", layer.o_bias, (h,)),
                (p + "self_attn.q_norm.weight", layer.q_norm, (d,)),
                (p + "self_attn.k_norm.weight", layer.k_norm, (d,)),
                (p + "post_attention_layernorm.weight", layer.post_norm, (h,)),
            ]
            if layer.experts is None:
                expected += [
                    (p + "mlp.gate/up_proj.weight", layer.gate_up, (2 * inter, h)),
                    (p + "mlp.gate/up_proj.bias", layer.gate_up_bias, (2 * inter,)),
                    (p + "mlp.down_proj.weight", layer.down, (h, inter)),
                    (p + "mlp.down_proj.bias", layer.down_bias, (h,)),
                ]
            else:
                e, mi = spec.num_experts, spec.moe_intermediate_size
                expected += [
                    (p + "experts router", layer.experts.router, (e, h)),
                    (p + "experts gate/up", layer.experts.gate_up, (e, 2 * mi, h)),
                    (p + "experts down", layer.experts.down, (e, h, mi)),
                ]
        for name, tensor, shape in expected:
            if tensor is not None and tuple(tensor.shape) != shape:
                raise ModelLoadError(
                    f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, but config.json implies {shape}"
                )

    def _norm(self, weight: torch.Tensor) -> torch.Tensor:
        """Gemma's norms multiply by (1 + w), computed in fp32 as transformers does."""
        if self.spec.gemma and weight.numel():
            return (1.0 + weight.float()).to(weight.dtype)
        return weight

    def _layer(self, spec: ModelSpec, w: _Weights, i: int) -> _Layer:
        p = f"model.layers.{i}."
        experts = None
        if spec.family == "phi3":  # Phi-3 stores q/k/v and gate/up already fused
            qkv, gate_up = w.take(p + "self_attn.qkv_proj.weight"), w.take(p + "mlp.gate_up_proj.weight")
        else:
            qkv = w.take_cat([p + f"self_attn.{x}_proj.weight" for x in "qkv"])
        if spec.moe_layers and spec.moe_layers[i]:
            experts = self._experts(spec, w, p)
            gate_up = down = torch.empty(0)
        elif spec.family != "phi3":
            gate_up = w.take_cat([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"])
        layer = _Layer(
            input_norm=self._norm(w.take(p + "input_layernorm.weight")),
            qkv=qkv,
            qkv_bias=w.take_cat([p + f"self_attn.{x}_proj.bias" for x in "qkv"]) if spec.qkv_bias else None,
            o=w.take(p + "self_attn.o_proj.weight"),
            o_bias=w.take(p + "self_attn.o_proj.bias") if spec.o_bias else None,
            post_norm=self._norm(w.take(p + "post_attention_layernorm.weight")),
            gate_up=gate_up,
            gate_up_bias=(
                w.take_cat([p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias"]) if spec.mlp_bias else None
            ),
            down=down if experts else w.take(p + "mlp.down_proj.weight"),
            down_bias=w.take(p + "mlp.down_proj.bias") if spec.mlp_bias else None,
            window=spec.layer_windows[i] if spec.layer_windows else None,
            experts=experts,
        )
        if spec.qk_norm:
            layer.q_norm = self._norm(w.take(p + "self_attn.q_norm.weight"))
            layer.k_norm = self._norm(w.take(p + "self_attn.k_norm.weight"))
        if spec.gemma:
            layer.pre_ff_norm = self._norm(w.take(p + "pre_feedforward_layernorm.weight"))
            layer.post_ff_norm = self._norm(w.take(p + "post_feedforward_layernorm.weight"))
            layer.rope = 1 if layer.window and spec.local_rope_theta is not None else 0  # Gemma 3 local rope
        return layer

    @staticmethod
    def _experts(spec: ModelSpec, w: _Weights, p: str) -> _Experts:
        if spec.family == "mixtral":  # w1 = gate, w3 = up, w2 = down
            block, gate, up, down = p + "block_sparse_moe.", "w1", "w3", "w2"
        else:
            block, gate, up, down = p + "mlp.", "gate_proj", "up_proj", "down_proj"
        e = range(spec.num_experts)
        gate_up = [
            w.take_cat([f"{block}experts.{j}.{gate}.weight", f"{block}experts.{j}.{up}.weight"]) for j in e
        ]
        down_proj = [w.take(f"{block}experts.{j}.{down}.weight") for j in e]

        def stack(parts: list[torch.Tensor]) -> torch.Tensor:  # a missing expert is reported later
            return torch.stack(parts) if len({t.shape for t in parts}) == 1 else torch.empty(0)

        return _Experts(
            router=w.take(block + "gate.weight"),
            gate_up=stack(gate_up),
            down=stack(down_proj),
            top_k=spec.experts_per_token,
            renormalize=spec.moe_renormalize,
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
        eps = spec.rms_norm_eps
        caches = self._layer_caches(kv_cache)
        hidden = F.embedding(input_ids, self.embed)
        if self.embed_scale is not None:
            hidden = hidden * self.embed_scale
        longest = (
            self._longest_context(meta) if self.has_windows and spec.attn_logit_softcapping is None else 0
        )
        residual: torch.Tensor | None = None
        for layer, (k_cache, v_cache) in zip(self.layers, caches, strict=True):
            if residual is None:
                residual = hidden
                x = self.ops.rms_norm(hidden, layer.input_norm, eps)
            else:
                x, residual = self.ops.fused_add_rms_norm(hidden, residual, layer.input_norm, eps)
            attn = self._self_attention(layer, x, positions, meta, k_cache, v_cache, longest)
            if spec.gemma:  # norm the attention output, add it, norm again before the MLP
                attn = self.ops.rms_norm(attn, layer.post_norm, eps)
                x, residual = self.ops.fused_add_rms_norm(attn, residual, layer.pre_ff_norm, eps)
                hidden = self.ops.rms_norm(self._feed_forward(layer, x), layer.post_ff_norm, eps)
            else:
                x, residual = self.ops.fused_add_rms_norm(attn, residual, layer.post_norm, eps)
                hidden = self._feed_forward(layer, x)
        assert residual is not None
        if logits_indices.shape[0] != input_ids.shape[0]:  # only the rows that sample need the head
            hidden = hidden.index_select(0, logits_indices)
            residual = residual.index_select(0, logits_indices)
        x, _ = self.ops.fused_add_rms_norm(hidden, residual, self.norm, eps)
        logits = F.linear(x, self.lm_head).float()
        if spec.final_logit_softcapping:
            cap = float(spec.final_logit_softcapping)
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _self_attention(
        self,
        layer: _Layer,
        x: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        longest: int,
    ) -> torch.Tensor:
        spec = self.spec
        t = x.shape[0]
        qkv = F.linear(x, layer.qkv, layer.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, spec.num_heads, spec.head_dim)
        k = k.reshape(t, spec.num_kv_heads, spec.head_dim)
        v = v.reshape(t, spec.num_kv_heads, spec.head_dim)
        if layer.q_norm is not None:
            q = self.ops.rms_norm(q, layer.q_norm, spec.rms_norm_eps)
            k = self.ops.rms_norm(k, layer.k_norm, spec.rms_norm_eps)
        q, k = self.ops.apply_rotary(q, k, positions, self.cos_sin[layer.rope], True)
        self.ops.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        if spec.attn_logit_softcapping is not None or (layer.window is not None and longest > layer.window):
            attn = windowed_attention(
                q, k_cache, v_cache, meta, self.scale, layer.window, spec.attn_logit_softcapping
            )
        else:  # within the window, full causal attention is the same thing
            attn = self._attention(q, k_cache, v_cache, meta)
        return F.linear(attn.reshape(t, self.q_size), layer.o, layer.o_bias)

    def _feed_forward(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        """The expert block on MoE layers, else the dense MLP (which a compiled variant may replace)."""
        return self._mlp(layer, x) if layer.experts is None else self._moe(layer.experts, x)

    def _mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        gate_up = F.linear(x, layer.gate_up, layer.gate_up_bias)
        if self.spec.hidden_act == "silu":
            act = self.ops.silu_and_mul(gate_up)
        else:  # gelu_pytorch_tanh (Gemma)
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.gelu(gate, approximate="tanh") * up
        return F.linear(act, layer.down, layer.down_bias)

    def _moe(self, experts: _Experts, x: torch.Tensor) -> torch.Tensor:
        """Softmax routing over all experts, top-k, optional renormalisation; each expert runs on
        its tokens only, and the weighted outputs are summed in expert order (as transformers)."""
        probs = torch.softmax(F.linear(x, experts.router).float(), dim=-1)
        weights, chosen = torch.topk(probs, experts.top_k, dim=-1)
        if experts.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for expert in torch.unique(chosen).tolist():  # sorted, like transformers' expert loop
            tokens, slot = torch.where(chosen == expert)
            h = self.ops.silu_and_mul(F.linear(x[tokens], experts.gate_up[expert]))
            h = F.linear(h, experts.down[expert]) * weights[tokens, slot, None]
            out.index_add_(0, tokens, h.to(out.dtype))
        return out

    @staticmethod
    def _longest_context(meta: AttentionMetadata) -> int:
        """The longest context in the batch (one host sync per step, only for windowed models)."""
        lens = [
            t for t in (meta.decode_context_lens, meta.prefill_context_lens) if t is not None and t.numel()
        ]
        return max(int(t.max()) for t in lens) if lens else 0

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
                self.ops.paged_decode_attention(
                    q[:nd], k_cache, v_cache, meta.decode_context_lens, meta.decode_block_tables, self.scale
                )
            )
        if nd < q.shape[0]:
            parts.append(
                self.ops.paged_prefill_attention(
                    q[nd:],
                    k_cache,
                    v_cache,
                    meta.prefill_cu_seqlens,
                    meta.prefill_context_lens,
                    meta.prefill_block_tables,
                    self.scale,
                    meta.prefill_max_q_len,
                )
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts)
