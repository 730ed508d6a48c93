"""The "triton" backend: the GPU kernels of kiln/kernels where they apply, the torch reference
elsewhere (prompt processing: attention, mat-muls of more than matvec.MAX_M rows, MoE with host
routing; embedding lookups and RoPE of the unfused path).

Every op here keeps the reference's signature and is graph-capturable for a decode step: no
host synchronization, launch parameters from shapes only.
"""

from __future__ import annotations

import torch

from kiln.ops import reference
from kiln.ops.weight import Weight


def ops() -> dict:
    from kiln.kernels import activation, attention, matvec, moe, norm, rope

    def linear(x: torch.Tensor, weight: Weight, bias: Weight | None = None) -> torch.Tensor:
        """x: [T, n_in] -> [T, n_out]; the mat-vec kernel for decode batches."""
        if (
            x.dim() == 2
            and x.shape[0] <= matvec.MAX_M
            and len(weight.shape) == 2
            and weight.qtype in matvec.SUPPORTED
        ):
            y = matvec.matvec(x.contiguous(), weight)
            return y if bias is None else y + bias.dense()
        return reference.linear(x, weight, bias)

    def moe_route(x, router, n_used, normalize):
        return reference.moe_select(linear(x, router), n_used, normalize)

    def expert_linear(x, ids, weight):
        if weight.qtype in matvec.SUPPORTED:
            return moe.expert_linear(x.contiguous(), ids, weight)
        return reference.expert_linear(x, ids, weight)

    table = {
        "embedding": reference.embedding,
        "linear": linear,
        "rms_norm": norm.rms_norm,
        "add_rms_norm": norm.add_rms_norm,
        "qk_norm": norm.qk_norm,
        "qkv_norm_rope": rope.qkv_norm_rope,
        "rope_frequencies": reference.rope_frequencies,
        "rope": reference.rope,
        "attention": reference.attention,
        "attention_decode": attention.attention_decode,
        "swiglu": activation.swiglu,
        "moe_route": moe_route,
        "moe_ffn": reference.moe_ffn,
        "expert_linear": expert_linear,
    }
    return table
