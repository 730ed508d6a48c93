"""The "triton" backend: the GPU kernels of kiln/kernels where they apply, the torch reference
elsewhere (prompt processing: attention, mat-muls of more than matvec.MAX_M rows, MoE with host
routing; embeddings of other formats and RoPE of the unfused path).

Every op here keeps the reference's signature and is graph-capturable for a decode step: no
host synchronization, launch parameters from shapes only. With `pdl` (the fusion of that name)
every kernel is launched with programmatic dependent launch (kiln/kernels/triton/pdl.py).
"""

from __future__ import annotations

from functools import partial

import torch

from kiln.ops import reference
from kiln.weight import Weight


def ops(pdl: bool = False) -> dict:
    from kiln.kernels import activation, attention, matvec, moe, norm, rope
    from kiln.kernels import embedding as lookup
    from kiln.kernels import router as moe_router

    def embedding(weight: Weight, ids: torch.Tensor) -> torch.Tensor:
        """ids: [T] -> [T, n_embd] f32: the rows gathered and dequantized in one launch."""
        if len(weight.shape) == 2 and weight.qtype in lookup.SUPPORTED and ids.dim() == 1:
            return lookup.embedding(weight, ids.contiguous(), pdl=pdl)
        return reference.embedding(weight, ids)

    def linear(x: torch.Tensor, weight: Weight, bias: Weight | None = None) -> torch.Tensor:
        """x: [T, n_in] -> [T, n_out]; the mat-vec kernel for decode batches."""
        if (
            x.dim() == 2
            and x.shape[0] <= matvec.MAX_M
            and len(weight.shape) == 2
            and weight.qtype in matvec.SUPPORTED
        ):
            y = matvec.matvec(x.contiguous(), weight, pdl=pdl)
            return y if bias is None else y + bias.dense()
        return reference.linear(x, weight, bias)

    def moe_route(x, router, n_used, normalize):
        """Decode (one row): softmax + top-k in one launch; prompts: the reference's selection."""
        logits = linear(x, router)  # [T, n_expert] f32
        if (
            logits.shape[0] == 1
            and logits.shape[1] <= moe_router.MAX_E
            and logits.dtype == torch.float32
        ):
            return moe_router.route_topk(logits, n_used, normalize, pdl=pdl)
        return reference.moe_select(logits, n_used, normalize)

    def moe_combine(down, weights):
        """down: [k, N] f32 (expert_linear's output), weights: [1, k] -> [1, N] in one launch."""
        if (
            down.dim() == 2
            and tuple(weights.shape) == (1, down.shape[0])
            and down.dtype == weights.dtype == torch.float32
        ):
            return moe_router.combine(down, weights, pdl=pdl)
        return reference.moe_combine(down, weights)

    def expert_linear(x, ids, weight):
        if weight.qtype in matvec.SUPPORTED:
            return moe.expert_linear(x.contiguous(), ids, weight, pdl=pdl)
        return reference.expert_linear(x, ids, weight)

    table = {
        "embedding": embedding,
        "linear": linear,
        "rms_norm": partial(norm.rms_norm, pdl=pdl),
        "add_rms_norm": partial(norm.add_rms_norm, pdl=pdl),
        "qk_norm": partial(norm.qk_norm, pdl=pdl),
        "qkv_norm_rope": partial(rope.qkv_norm_rope, pdl=pdl),
        "rope_frequencies": reference.rope_frequencies,
        "rope": reference.rope,
        "attention": reference.attention,
        "attention_decode": partial(attention.attention_decode, pdl=pdl),
        "swiglu": partial(activation.swiglu, pdl=pdl),
        "moe_route": moe_route,
        "moe_ffn": reference.moe_ffn,
        "expert_linear": expert_linear,
        "moe_combine": moe_combine,
    }
    return table
