"""The decoder blocks every supported architecture is built from.

A model calls only kiln.ops through its OpSet, so the same code runs the torch reference on any
device and, with another backend, the GPU kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from kiln.config import ModelConfig
from kiln.errors import UnsupportedError
from kiln.ops import Weight
from kiln.runtime.kv_cache import KVCache


@dataclass(frozen=True)
class BlockStyle:
    """What an architecture file chooses; the rest follows from ModelConfig.spec."""

    rope_neox: bool  # qwen: rotate (i, i + d/2); llama GGUFs: adjacent pairs
    moe: bool = False
    moe_normalize: bool = True  # renormalize the top-k router weights to sum to 1


class DecoderModel:
    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, Weight],
        ops: SimpleNamespace,
        style: BlockStyle,
    ):
        if config.rope_scaling.kind == "yarn":
            raise UnsupportedError(f"{config.name}: YaRN RoPE scaling is not implemented yet")
        self.config, self.w, self.ops, self.style = config, weights, ops, style
        self.device = weights["token_embd.weight"].device
        factors = weights.get("rope_freqs.weight")
        self.freqs = ops.rope_frequencies(
            config.rope_dim,
            config.rope_base,
            factors.dense() if factors is not None else None,
            self.device,
        )
        if config.rope_scaling.kind == "linear":
            self.freqs = self.freqs / config.rope_scaling.factor
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.lm_head = weights.get("output.weight", weights["token_embd.weight"])

    def forward(self, ids: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """ids: [T] appended to the cache -> logits float32 [T or 1, n_vocab]."""
        c, ops = self.config, self.ops
        n = ids.shape[0]
        start = cache.length
        cache.reserve(n)
        positions = torch.arange(start, start + n, device=self.device)
        h = ops.embedding(self.w["token_embd.weight"], ids)
        x = ops.rms_norm(h, self.w["blk.0.attn_norm.weight"], c.rms_eps)
        for i in range(c.n_layer):
            p = f"blk.{i}."
            attn = self._attention(i, x, positions, cache, start)
            h, x = ops.add_rms_norm(attn, h, self.w[p + "ffn_norm.weight"], c.rms_eps)
            ffn = self._ffn(i, x)
            next_norm = (
                self.w[f"blk.{i + 1}.attn_norm.weight"]
                if i + 1 < c.n_layer
                else self.w["output_norm.weight"]
            )
            h, x = ops.add_rms_norm(ffn, h, next_norm, c.rms_eps)
        cache.length = start + n
        if not all_logits:
            x = x[-1:]
        return ops.linear(x, self.lm_head)

    def _attention(
        self, i: int, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int
    ) -> torch.Tensor:
        c, ops, w, p = self.config, self.ops, self.w, f"blk.{i}."
        spec = c.spec
        n = x.shape[0]
        q = ops.linear(x, w[p + "attn_q.weight"], w.get(p + "attn_q.bias"))
        k = ops.linear(x, w[p + "attn_k.weight"], w.get(p + "attn_k.bias"))
        v = ops.linear(x, w[p + "attn_v.weight"], w.get(p + "attn_v.bias"))
        q = q.view(n, c.n_head, c.head_dim)
        k = k.view(n, c.n_head_kv, c.head_dim)
        v = v.view(n, c.n_head_kv, c.head_dim_v)
        if spec.qk_norm:
            q = ops.rms_norm(q, w[p + "attn_q_norm.weight"], c.rms_eps)
            k = ops.rms_norm(k, w[p + "attn_k_norm.weight"], c.rms_eps)
        q = ops.rope(q, positions, self.freqs, self.style.rope_neox)
        k = ops.rope(k, positions, self.freqs, self.style.rope_neox)
        cache.write(i, start, k, v)
        keys, values = cache.view(i, start + n)
        out = ops.attention(q, keys, values, positions, self.scale)
        return ops.linear(out.reshape(n, c.n_head * c.head_dim_v), w[p + "attn_output.weight"])

    def _ffn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        c, ops, w, p = self.config, self.ops, self.w, f"blk.{i}."
        if self.style.moe:
            weights, ids = ops.moe_route(
                x, w[p + "ffn_gate_inp.weight"], c.n_expert_used, self.style.moe_normalize
            )
            return ops.moe_ffn(
                x,
                weights,
                ids,
                w[p + "ffn_gate_exps.weight"],
                w[p + "ffn_up_exps.weight"],
                w[p + "ffn_down_exps.weight"],
            )
        gate = ops.linear(x, w[p + "ffn_gate.weight"])
        up = ops.linear(x, w[p + "ffn_up.weight"])
        return ops.linear(ops.swiglu(gate, up), w[p + "ffn_down.weight"])
