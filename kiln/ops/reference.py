"""The torch reference of every op: the spec, the CPU path and the test oracle.

All arithmetic is float32. Shapes: T tokens, H query heads, Hkv KV heads, D head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.ops.weight import Weight


def embedding(weight: Weight, ids: torch.Tensor) -> torch.Tensor:
    """ids: [T] -> [T, n_embd]."""
    return weight.rows(ids)


def linear(x: torch.Tensor, weight: Weight, bias: Weight | None = None) -> torch.Tensor:
    """x: [T, n_in] -> [T, n_out]."""
    return F.linear(x, weight.dense(), bias.dense() if bias is not None else None)


def rms_norm(x: torch.Tensor, weight: Weight, eps: float) -> torch.Tensor:
    """x: [..., n] normalized over the last dimension, times weight [n]."""
    x = x.float()
    scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * scale * weight.dense()


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: Weight, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + x, rms_norm(residual + x)): the unfused form of the add_rms_norm fusion."""
    h = residual + x
    return h, rms_norm(h, weight, eps)


def rope_frequencies(
    rope_dim: int, base: float, freq_factors: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """[rope_dim // 2] angular frequencies base^(-2i/rope_dim), divided by llama 3's factors."""
    i = torch.arange(0, rope_dim, 2, device=device, dtype=torch.float32)
    freqs = 1.0 / (base ** (i / rope_dim))
    if freq_factors is not None:
        freqs = freqs / freq_factors.to(device=device, dtype=torch.float32)
    return freqs


def rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, neox: bool) -> torch.Tensor:
    """x: [T, heads, D]; rotates the first 2*len(freqs) dims of each head by position*freq.

    neox=False (llama in GGUF): pairs are adjacent dims (2i, 2i+1); neox=True (qwen): (i, i+d/2).
    """
    rot = 2 * freqs.numel()
    angles = positions.to(torch.float32)[:, None] * freqs[None, :]  # [T, rot/2]
    cos = torch.cos(angles)[:, None, :]
    sin = torch.sin(angles)[:, None, :]
    xr, rest = x[..., :rot].float(), x[..., rot:]
    if neox:
        a, b = xr[..., : rot // 2], xr[..., rot // 2 :]
        out = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    else:
        a, b = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return torch.cat((out, rest.float()), dim=-1) if rest.numel() else out


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of T queries over the first S cache entries of one sequence.

    q: [T, H, D]; k: [S, Hkv, D]; v: [S, Hkv, Dv]; q_positions: [T] (key j is visible to query i
    when j <= q_positions[i]) -> [T, H, Dv].
    """
    n_head, n_kv = q.shape[1], k.shape[1]
    group = n_head // n_kv
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    key_pos = torch.arange(k.shape[0], device=q.device)
    mask = key_pos[None, :] <= q_positions[:, None]  # [T, S]
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def moe_route(
    x: torch.Tensor, router: Weight, n_used: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, n_embd] -> (weights [T, k], expert ids [T, k]): softmax over experts, top-k."""
    probs = torch.softmax(linear(x, router), dim=-1)
    weights, ids = torch.topk(probs, n_used, dim=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def moe_ffn(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gate: Weight,
    up: Weight,
    down: Weight,
) -> torch.Tensor:
    """Sum over each token's selected experts of weight * down(silu(gate x) * up x)."""
    out = torch.zeros_like(x, dtype=torch.float32)
    for e in torch.unique(ids).tolist():
        token, slot = (ids == e).nonzero(as_tuple=True)
        xe = x[token]
        h = swiglu(xe @ gate.expert(e).T, xe @ up.expert(e).T)
        out.index_add_(0, token, (h @ down.expert(e).T) * weights[token, slot, None])
    return out
