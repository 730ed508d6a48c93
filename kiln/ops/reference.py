"""The torch reference of every op: the spec, the CPU path and the test oracle.

All arithmetic is float32. Shapes: T tokens, H query heads, Hkv KV heads, D head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.weight import Weight


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


def attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    length: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token over the first `length` entries of a cache of capacity C.

    q: [1, H, D]; k_cache: [C, Hkv, D]; v_cache: [C, Hkv, Dv] (f16/bf16/f32); length: int64 [1]
    on the device (read there, so one captured CUDA graph serves every position) -> f32 [1, H, Dv].
    """
    positions = (length - 1).reshape(1)
    return attention(q, k_cache, v_cache, positions, scale)


def qk_norm(
    q: torch.Tensor, k: torch.Tensor, q_weight: Weight, k_weight: Weight, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-head Q and K RMSNorms of qwen3: q: [T, H, D], k: [T, Hkv, D] (views of a merged QKV
    result are fine) -> (q, k) float32, each normalized over D times its weight [D]."""
    return rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)


def qkv_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: Weight | None,
    k_weight: Weight | None,
    eps: float,
    positions: torch.Tensor,
    freqs: torch.Tensor,
    neox: bool,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> torch.Tensor:
    """Decode attention input: Q/K head RMSNorm (when the weights are given), RoPE, and K, V
    written into the cache at `positions` (a device tensor, so no host sync).

    q: [T, H, D], k: [T, Hkv, D], v: [T, Hkv, Dv] (views of a merged QKV result are fine);
    positions: int64 [T]; k_cache: [C, Hkv, D], v_cache: [C, Hkv, Dv] -> q float32 [T, H, D].
    """
    if q_weight is not None:
        q, k = qk_norm(q, k, q_weight, k_weight, eps)
    q = rope(q, positions, freqs, neox)
    k = rope(k, positions, freqs, neox)
    k_cache.index_copy_(0, positions, k.to(k_cache.dtype))
    v_cache.index_copy_(0, positions, v.to(v_cache.dtype))
    return q


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: [T, F] (column halves of a merged gate/up result are fine) -> silu(gate) * up."""
    return F.silu(gate.float()) * up.float()


def moe_route(
    x: torch.Tensor, router: Weight, n_used: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, n_embd] -> (weights [T, k], expert ids [T, k]): softmax over experts, top-k."""
    return moe_select(linear(x, router), n_used, normalize)


def moe_select(
    router_logits: torch.Tensor, n_used: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [T, n_expert] -> the top-k softmax weights (renormalized to sum to 1 when
    normalize) and their expert ids, [T, k] each. Device ops only: graph-capturable."""
    probs = torch.softmax(router_logits, dim=-1)
    weights, ids = torch.topk(probs, n_used, dim=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def expert_linear(x: torch.Tensor, ids: torch.Tensor, weight: Weight) -> torch.Tensor:
    """The selected experts' mat-vecs of one token: x: [1, K] (every expert reads it) or [k, K]
    (slot i reads row i); ids: int [k]; weight: [n_expert, N, K] -> f32 [k, N]."""
    rows = x.float().expand(ids.shape[0], -1) if x.shape[0] == 1 else x.float()
    w = torch.stack([weight.expert(int(e)) for e in ids.tolist()])  # [k, N, K]
    return torch.einsum("sk,snk->sn", rows, w)


def moe_combine(down: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One token's expert outputs weighted and summed: down: [k, N] (row s: slot s's expert),
    weights: [1, k] -> [1, N] = sum_s weights[0, s] * down[s]."""
    return (down * weights[0, :, None]).sum(0, keepdim=True)


def moe_ffn(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gate: Weight,
    up: Weight | None,
    down: Weight,
) -> torch.Tensor:
    """Sum over each token's selected experts of weight * down(silu(gate x) * up x).

    x: [T, n_embd]; weights, ids: [T, k]; gate, up: [n_expert, F, n_embd], or up None and gate the
    merged [n_expert, 2F, n_embd] (merged_gate_up); down: [n_expert, n_embd, F] -> f32 [T, n_embd].
    """
    out = torch.zeros_like(x, dtype=torch.float32)
    for e in torch.unique(ids).tolist():
        token, slot = (ids == e).nonzero(as_tuple=True)
        xe = x[token].float()
        if up is None:
            g, u = (xe @ gate.expert(e).T).chunk(2, dim=-1)
        else:
            g, u = xe @ gate.expert(e).T, xe @ up.expert(e).T
        h = swiglu(g, u)
        out.index_add_(0, token, (h @ down.expert(e).T) * weights[token, slot, None])
    return out
