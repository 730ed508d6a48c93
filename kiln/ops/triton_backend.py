"""The "triton" backend: the GPU kernels of kiln/kernels where they apply, the torch reference
elsewhere. Which is which follows from the op and the shapes only (ROUTES says it; `kiln info
--device cuda` prints it): the decode-shaped work (up to matvec.MAX_M rows, one query per
sequence) runs on kernels; prompt processing (mat-muls of more rows, causal attention of many
queries, MoE grouped by expert) runs the reference until the prompt kernels exist; weight formats
a kernel lacks run the reference for that weight.

Every kernel path here keeps the reference's signature and is graph-capturable: no host
synchronization, launch parameters from shapes only. With `pdl` (the fusion of that name) every
kernel is launched with programmatic dependent launch (kiln/kernels/triton/pdl.py).
"""

from __future__ import annotations

from functools import partial

import torch

from kiln.ops import reference
from kiln.weight import Weight


def ops(pdl: bool = False) -> dict:
    from kiln.kernels import activation, matvec, norm, rope
    from kiln.kernels import attention as paged
    from kiln.kernels import embedding as lookup
    from kiln.kernels import router as moe_router
    from kiln.kernels.formats import SUPPORT

    def embedding(weight: Weight, ids: torch.Tensor) -> torch.Tensor:
        """ids: [T] -> [T, n_embd] f32: the rows gathered and dequantized in one launch."""
        if len(weight.shape) == 2 and weight.qtype in SUPPORT["embedding"] and ids.dim() == 1:
            return lookup.embedding(weight, ids.contiguous(), pdl=pdl)
        return reference.embedding(weight, ids)

    def linear(x: torch.Tensor, weight: Weight, bias: Weight | None = None) -> torch.Tensor:
        """x: [T, n_in] -> [T, n_out]; the mat-vec kernel for decode batches."""
        if (
            x.dim() == 2
            and x.shape[0] <= matvec.MAX_M
            and len(weight.shape) == 2
            and weight.qtype in SUPPORT["matvec"]
        ):
            y = matvec.matvec(x.contiguous(), weight, pdl=pdl)
            return y if bias is None else y + bias.dense()
        return reference.linear(x, weight, bias)

    def moe_route(x, router, n_used, normalize):
        """Up to matvec.MAX_M rows: softmax + top-k per row in one launch; more (prompts): the
        reference's selection."""
        logits = linear(x, router)  # [T, n_expert] f32
        if (
            logits.shape[0] <= matvec.MAX_M
            and logits.shape[1] <= moe_router.MAX_E
            and logits.dtype == torch.float32
        ):
            return moe_router.route_topk(logits, n_used, normalize, pdl=pdl)
        return reference.moe_select(logits, n_used, normalize)

    def attention(q, k_pool, v_pool, batch, scale):
        """One query per sequence (decode): flash-decoding over the paged pool, lengths and
        block tables read on the device; otherwise (prompts) the reference."""
        if batch.decode:
            return paged.attention_decode(
                q.contiguous(),
                k_pool,
                v_pool,
                batch.block_tables,
                batch.seq_lens,
                batch.block_size,
                scale,
                pdl=pdl,
            )
        return reference.attention(q, k_pool, v_pool, batch, scale)

    table = {
        "embedding": embedding,
        "linear": linear,
        "rms_norm": partial(norm.rms_norm, pdl=pdl),
        "add_rms_norm": partial(norm.add_rms_norm, pdl=pdl),
        "qk_norm": partial(norm.qk_norm, pdl=pdl),
        "qkv_norm_rope": partial(rope.qkv_norm_rope, pdl=pdl),
        "rope_frequencies": reference.rope_frequencies,
        "rope": reference.rope,
        "attention": attention,
        "swiglu": partial(activation.swiglu, pdl=pdl),
        "moe_route": moe_route,
        "moe_ffn": reference.moe_ffn,  # composed below, once the set's swiglu is known
    }
    return table


def compose(ops) -> dict:
    """moe_ffn over the finished op set (its swiglu is the fused kernel or its decomposition):
    up to matvec.MAX_M rows, each row's k experts as per-slot mat-vecs (one launch per weight,
    expert ids read on the device), the weighted sum in one launch; more rows (prompts): the
    reference, grouped by expert on the host."""
    from kiln.kernels import matvec, moe
    from kiln.kernels import router as moe_router
    from kiln.kernels.formats import SUPPORT

    pdl = ops.pdl

    def expert_linear(x, ids, weight):
        if weight.qtype in SUPPORT["expert_linear"]:
            return moe.expert_linear(x.contiguous(), ids, weight, pdl=pdl)
        return reference.expert_linear(x, ids, weight)

    def moe_ffn(x, weights, ids, gate, up, down):
        if x.shape[0] > matvec.MAX_M:
            return reference.moe_ffn(x, weights, ids, gate, up, down)
        if up is None:  # merged gate/up [n_expert, 2F, n_embd]
            gate_out, up_out = expert_linear(x, ids, gate).chunk(2, dim=-1)  # [T*k, F] each
        else:
            gate_out, up_out = expert_linear(x, ids, gate), expert_linear(x, ids, up)
        out = expert_linear(ops.swiglu(gate_out, up_out), ids, down)  # [T*k, n_embd]
        if out.dtype == weights.dtype == torch.float32:
            return moe_router.combine(out, weights, pdl=pdl)
        return reference.moe_combine(out, weights)

    return {"moe_ffn": moe_ffn}


def kernel_reads(name: str, qtype) -> bool:
    """Whether a kernel reads this weight's format: the token embedding (a lookup), the other
    matrices and expert stacks (mat-vecs), vectors (norm weights and biases: the norm and add
    kernels read them as float32)."""
    from kiln.kernels import formats

    if name.endswith(("norm.weight", ".bias")) or name == "rope_freqs.weight":
        return True  # vectors: read as float32 by the norm kernels and the bias add
    if name == "token_embd.weight":
        return formats.supports("embedding", qtype)
    if name.endswith("_exps.weight"):
        return formats.supports("expert_linear", qtype)
    return formats.supports("matvec", qtype)


ROUTES = {
    "embedding": "kernel (the mat-vec formats); reference for other formats",
    "linear": "mat-vec kernel up to 8 rows; reference above (prompts) and for other formats",
    "rms_norm": "kernel",
    "add_rms_norm": "kernel",
    "qk_norm": "kernel",
    "qkv_norm_rope": "kernel (norm, RoPE, paged K/V write)",
    "rope": "reference (only the unfused qkv_norm_rope calls it)",
    "attention": "flash-decoding kernel over the paged pool for one query per sequence; "
    "reference for prompts",
    "swiglu": "kernel",
    "moe_route": "kernel up to 8 rows; reference above",
    "moe_ffn": "per-row expert mat-vec kernels + combine kernel up to 8 rows; reference "
    "(grouped by expert) above",
}
