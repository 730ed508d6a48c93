"""The torch reference of every op: the spec, the CPU path and the test oracle.

All arithmetic is float32. Shapes: T tokens, H query heads, Hkv KV heads, D head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.quant.kv import rotated_like, write_rows
from kiln.weight import Weight

ROUTES: dict[str, str] = {}  # every op is the reference: the spec, on any device


def ops(pdl: bool = False) -> dict:
    """The reference as an op set (the "torch" backend); pdl has no meaning here."""
    from kiln.ops import OP_NAMES

    return {name: globals()[name] for name in OP_NAMES}


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
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, batch, scale: float
) -> torch.Tensor:
    """Causal attention of a ForwardBatch's T queries over the paged KV pool.

    q: [T, H, D]; k_pool: [S, Hkv, D]; v_pool: [S, Hkv, Dv] (the layer's pool, this step's K/V
    already written; a float tensor or kiln.quant.kv.QuantizedRows, whose rows read back
    dequantized through .float()); batch: kiln.runtime.batch.ForwardBatch (each sequence's
    queries are contiguous; a key at position j is visible to a query at position p when
    j <= p) -> f32 [T, H, Dv]. Reads the batch's host lengths: not capturable (prompts, the
    reference). Pools of rows stored rotated (kiln/quant/kv.py): q comes rotated like K (from
    qkv_norm_rope), and the output is rotated back where V is (H is its own inverse).
    """
    out = per_sequence(q, k_pool, v_pool, batch, lambda qs, k, v, pos: causal(qs, k, v, pos, scale))
    return rotated_like(out, v_pool)


def per_sequence(q, k_pool, v_pool, batch, attend) -> torch.Tensor:
    """attend(q_b, k_b, v_b, positions_b) for each sequence b of the batch, over its keys
    0..kv_len-1 gathered from the pool (a slice when its blocks are consecutive) -> [T, H, Dv]."""
    out = []
    start = 0
    for b, (n, length) in enumerate(zip(batch.query_lens, batch.kv_lens)):
        rows = sequence_rows(batch, b, length, k_pool.device)
        if isinstance(rows, slice):
            k, v = k_pool[rows], v_pool[rows]
        else:
            k, v = k_pool.index_select(0, rows), v_pool.index_select(0, rows)
        out.append(attend(q[start : start + n], k, v, batch.positions[start : start + n]))
        start += n
    return torch.cat(out) if len(out) > 1 else out[0]


def sequence_rows(batch, b: int, length: int, device) -> slice | torch.Tensor:
    """The pool rows of sequence b's positions 0..length-1."""
    first = batch.first_rows[b]
    if first is not None:
        return slice(first, first + length)
    bs = batch.block_size
    n_blocks = -(-length // bs)
    blocks = batch.block_tables[b, :n_blocks].to(torch.int64)
    rows = blocks[:, None] * bs + torch.arange(bs, device=device)
    return rows.reshape(-1)[:length]


def causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of T queries over S keys of one sequence.

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
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """One query per sequence over its blocks of a paged KV cache.

    q: [B, H, D]; k_pool: [S, Hkv, D], v_pool: [S, Hkv, Dv] (f16/bf16/f32; S = n_blocks *
    block_size); block_tables: int [B, NB]; seq_lens: int64 [B] -> f32 [B, H, Dv]. Row b attends
    to positions 0 .. seq_lens[b] - 1 of sequence b, whose position j lives in pool row
    block_tables[b, j // block_size] * block_size + j % block_size. Table entries past the
    sequence's blocks are gathered but masked (any valid block id); rows past a length never
    reach the result, even NaN ones. Device ops only (no host sync): graph-capturable. Rotated
    pools as attention's.
    """
    n_rows, n_blocks = block_tables.shape
    n_head, n_kv, d = q.shape[1], k_pool.shape[1], q.shape[2]
    group = n_head // n_kv
    offs = torch.arange(block_size, device=q.device)
    rows = (block_tables.long()[:, :, None] * block_size + offs).reshape(n_rows, -1)  # [B, C]
    positions = torch.arange(n_blocks * block_size, device=q.device)
    visible = positions[None, :] < seq_lens[:, None]  # [B, C]
    k = k_pool[rows].float()  # [B, C, Hkv, D]
    v = torch.where(visible[:, :, None, None], v_pool[rows].float(), 0.0)  # no NaN * 0 below
    qg = q.float().reshape(n_rows, n_kv, group, d)  # head h = kv * G + g
    scores = torch.einsum("bkgd,bckd->bkgc", qg, k) * scale  # [B, Hkv, G, C]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgc,bckd->bkgd", probs, v)  # [B, Hkv, G, Dv]
    return rotated_like(out.reshape(n_rows, n_head, v_pool.shape[2]), v_pool)


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
    slots: torch.Tensor,
    freqs: torch.Tensor,
    neox: bool,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> torch.Tensor:
    """Decode attention input: Q/K head RMSNorm (when the weights are given), RoPE at
    `positions`, and K, V written into the cache pools at rows `slots` (device tensors, so no
    host sync).

    q: [T, H, D], k: [T, Hkv, D], v: [T, Hkv, Dv] (views of a merged QKV result are fine);
    positions: int64 [T] (the rotation); slots: int64 [T] (distinct pool rows, see
    attention_decode); k_cache: [S, Hkv, D], v_cache: [S, Hkv, Dv] (each in its cache type:
    kiln.quant.kv.write_rows converts or quantizes the rows) -> q float32 [T, H, D], rotated
    like K where the K pool stores its rows rotated (kiln/quant/kv.py: a block type).
    """
    if q_weight is not None:
        q, k = qk_norm(q, k, q_weight, k_weight, eps)
    q = rope(q, positions, freqs, neox)
    k = rope(k, positions, freqs, neox)
    write_rows(k_cache, slots, k)
    write_rows(v_cache, slots, v)
    return rotated_like(q, k_cache)


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


def _gather_experts(weight: Weight, index: torch.Tensor) -> torch.Tensor:
    """float32 [S, N, K]: the experts index (int64 [S], on the weight's device) of a stacked
    [n_expert, N, K] weight, gathered and dequantized on the device (no host sync). A merged
    weight whose blocks stay in its parts gathers each part's experts (never the whole stack)."""
    if weight.raw is None and not weight.keep_dense:
        return torch.cat([_gather_experts(p, index) for p in weight.parts], dim=-2)
    return weight.rows(index)  # keep_dense: the float copy's rows; else raw[index] dequantized


def expert_linear(x: torch.Tensor, ids: torch.Tensor, weight: Weight) -> torch.Tensor:
    """The selected experts' mat-vecs of T tokens: ids: int [T, k]; x: [T, K] (token t's k
    experts read row t) or [T*k, K] (slot s = t*k + j reads row s); weight: [n_expert, N, K]
    -> f32 [T*k, N], row t*k + j = x[t or t*k + j] @ W[ids[t, j]].T. Device ops only: the
    experts are gathered by index on the device, so it is graph-capturable."""
    t, k = ids.shape
    assert x.shape[0] in (t, t * k), f"x has {x.shape[0]} rows for ids [{t}, {k}]"
    if x.shape[0] == t * k:
        rows = x.float()
    else:  # [T, K] -> [T*k, K]; at T = 1 a stride-0 view, as one token's rows always were
        rows = x.float()[:, None, :].expand(t, k, x.shape[1]).reshape(t * k, x.shape[1])
    w = _gather_experts(weight, ids.reshape(-1).long())  # [T*k, N, K]
    return torch.einsum("sk,snk->sn", rows, w)


def moe_combine(down: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's expert outputs weighted and summed: down: [T*k, N] (row t*k + j: token t's
    slot j), weights: [T, k] -> [T, N], row t = sum_j weights[t, j] * down[t*k + j]."""
    t, k = weights.shape
    return (down.reshape(t, k, -1) * weights[:, :, None]).sum(1)


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
