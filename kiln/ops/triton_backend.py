"""The "triton" backend: the GPU kernels of kiln/kernels where they apply, the torch reference
elsewhere. Which is which follows from the op, the weight's format and the shapes only (ROUTES
says it; `kiln info --device cuda` prints it): mat-muls run the mat-vec up to matvec.MAX_M rows
(linear.batch_method from 2) and the quantized GEMM above (bf16 activations): the one dispatch of
kernels/linear.py; attention runs
flash-decoding for one query per sequence and flash attention for prompts, both over the paged
pool; MoE runs the per-row expert kernels up to MAX_M rows and the grouped GEMM above (the
slots sorted by expert on the device: no host synchronization); formats a kernel lacks, and
F32 weights above MAX_M rows, run the reference.

Every kernel path here keeps the reference's signature and is graph-capturable: no host
synchronization, launch parameters from shapes only. With `pdl` (the fusion of that name) every
kernel is launched with programmatic dependent launch (kiln/kernels/triton/pdl.py).
"""

from __future__ import annotations

from functools import partial

import torch

from kiln.ops import reference
from kiln.quant.q8_1 import Activation
from kiln.weight import Weight


def ops(pdl: bool = False) -> dict:
    from kiln.kernels import activation, matvec, norm, rope
    from kiln.kernels import attention as paged
    from kiln.kernels import embedding as lookup
    from kiln.kernels import flash_attention as flash
    from kiln.kernels import router as moe_router
    from kiln.kernels.formats import SUPPORT
    from kiln.kernels.linear import linear as kernel_linear

    def embedding(weight: Weight, ids: torch.Tensor) -> torch.Tensor:
        """ids: [T] -> [T, n_embd] f32: the rows gathered and dequantized in one launch."""
        if len(weight.shape) == 2 and weight.qtype in SUPPORT["embedding"] and ids.dim() == 1:
            return lookup.embedding(weight, ids.contiguous(), pdl=pdl)
        return reference.embedding(weight, ids)

    def linear(x: torch.Tensor, weight: Weight, bias: Weight | None = None) -> torch.Tensor:
        """x: [T, n_in] (or norm_quant's Activation) -> [T, n_out]: kiln.kernels.linear's
        dispatch by T (the mat-vec at one row, linear.batch_method up to matvec.MAX_M, the
        quantized GEMM above); the reference where no kernel reads the weight."""
        y = kernel_linear(x, weight, bias, pdl=pdl)
        if y is None:
            return reference.linear(Activation.floats(x, weight.name), weight, bias)
        return y

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
        """One query per sequence (decode): flash-decoding over the paged pool; otherwise
        (prompt chunks, mixed batches) causal flash attention over the pool in one launch.
        Lengths, query starts, positions and block tables are read on the device."""
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
        return flash.attention_prefill(
            q.contiguous(),
            k_pool,
            v_pool,
            batch.block_tables,
            batch.seq_lens,
            batch.query_start,
            batch.positions,
            batch.block_size,
            max(batch.query_lens),
            scale,
            pdl=pdl,
        )

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


def norm_quant(ops) -> dict:
    """With the norm_quant fusion on: rms_norm, add_rms_norm and swiglu given their consumers
    (the weights that read their rows: QKV, gate/up, down) quantize the rows to q8_1 in the
    same launch when some consumer reads q8_1 (kernels/linear.py's reads_q8_1, by which linear
    dispatches), write the floats only when some consumer reads floats, and return an
    Activation; otherwise (no consumers given, prompts, formats the int8 mat-vec does not read)
    the set's own op. linear quantizes float rows of 2..8 that an int8 kernel reads."""
    from kiln.kernels import activation, norm, quantize
    from kiln.kernels.linear import reads_q8_1

    plain_rms_norm, plain_add_rms_norm = ops.rms_norm, ops.add_rms_norm
    plain_swiglu = ops.swiglu

    def forms(x, consumers) -> tuple[bool, bool]:
        reads = [reads_q8_1(x.shape[0], w) for w in consumers]
        return any(reads), not all(reads)

    def rms_norm(x, weight, eps, consumers=()):
        quantize, write_y = forms(x, consumers)
        if not quantize:
            return plain_rms_norm(x, weight, eps)
        _h, y, q8 = norm.rms_norm_quant(x, weight, eps, write_y=write_y, pdl=ops.pdl)
        return Activation(y, q8)

    def add_rms_norm(x, residual, weight, eps, consumers=()):
        quantize, write_y = forms(x, consumers)
        if not quantize:
            return plain_add_rms_norm(x, residual, weight, eps)
        h, y, q8 = norm.rms_norm_quant(x, weight, eps, residual, write_y, pdl=ops.pdl)
        return h, Activation(y, q8)

    def swiglu(gate, up, consumers=()):
        quantize, write_y = forms(gate, consumers)
        if not quantize:
            return plain_swiglu(gate, up)
        y, q8 = activation.swiglu_quant(gate, up, write_y, pdl=ops.pdl)
        return Activation(y, q8)

    plain_linear = ops.linear

    def linear(x, weight, bias=None):
        """Float rows of a decode batch of 2..8 (the attention's output: no norm before it to
        quantize them) that an int8 kernel reads: quantized to q8_1 by a launch of their own
        first, as llama.cpp quantizes every mat-vec input. Not at one row: there the bf16
        mat-vec (4096 x 4096 Q4_K, H100: 12.3 us) beats the launch plus the int8 one (10.8 us
        + ~3), where from two rows on the int8 kernel wins by far (13.8 against 27.8 us)."""
        if (
            isinstance(x, torch.Tensor)
            and x.dim() == 2
            and x.shape[0] > 1
            and quantize.fits(x.shape[1])
            and reads_q8_1(x.shape[0], weight)
        ):
            x = Activation(None, quantize.quantize_q8_1(x.contiguous(), pdl=ops.pdl))
        return plain_linear(x, weight, bias)

    return {"rms_norm": rms_norm, "add_rms_norm": add_rms_norm, "swiglu": swiglu, "linear": linear}


def compose(ops) -> dict:
    """moe_ffn over the finished op set (its swiglu is the fused kernel or its decomposition).
    Below moe.grouped_min_tokens rows (decode), each row's k experts as per-slot mat-vecs (one
    launch per weight, expert ids read on the device); from it on (prompts), the slots sorted by
    expert on the device (moe.plan) and the grouped GEMM, one launch per weight (`moe_grouped`;
    off: one launch per expert over the same plan). The weighted sum of a token's k rows is one
    launch either way. Formats no kernel reads run the reference."""
    from kiln.kernels import activation, matvec_q8, moe
    from kiln.kernels import router as moe_router
    from kiln.kernels.formats import SUPPORT
    from kiln.kernels.linear import reads_q8_1

    pdl = ops.pdl
    grouped_linear = moe.grouped_expert_linear if ops.moe_grouped else moe.per_expert_linear

    def expert_linear(x, ids, weight):
        """x: floats, or norm_quant's Activation (q8_1 rows where reads_q8_1 said so: the int8
        expert mat-vec reads them)."""
        if isinstance(x, Activation):
            if x.q8 is not None and reads_q8_1(ids.shape[0], weight):
                return matvec_q8.expert_matvec_q8(x.q8, ids, weight, pdl=pdl)
            x = Activation.floats(x, weight.name)
        if weight.qtype in SUPPORT["expert_linear"]:
            return moe.expert_linear(x.contiguous(), ids, weight, pdl=pdl)
        return reference.expert_linear(x, ids, weight)

    def slot_swiglu(gate_out, up_out, tokens, down):
        """The SwiGLU rows of the slots, quantized in the same launch (swiglu_quant) where the
        down expert mat-vec reads q8_1 (norm_quant on)."""
        if ops.norm_quant and reads_q8_1(tokens, down):
            _y, q8 = activation.swiglu_quant(gate_out, up_out, False, pdl=pdl)
            return Activation(None, q8)
        return ops.swiglu(gate_out, up_out)

    def combine(out, weights):
        if out.dtype == weights.dtype == torch.float32:
            return moe_router.combine(out, weights, pdl=pdl)
        return reference.moe_combine(out, weights)

    def moe_ffn(x, weights, ids, gate, up, down):
        """x: [T, n_embd] floats, or (norm_quant) an Activation whose q8_1 rows the expert
        mat-vecs read where reads_q8_1 says so; the other paths read its floats."""
        tokens = ids.shape[0]
        if tokens < moe.grouped_min_tokens(ids.device):
            gate_up = partial(expert_linear, x, ids)
            gate_out, up_out = _gate_up(gate_up, gate, up)
            act = slot_swiglu(gate_out, up_out, tokens, down)
            return combine(expert_linear(act, ids, down), weights)
        x = Activation.floats(x, gate.name)
        if not all(moe.grouped_reads(w) for w in (gate, up or gate, down)):
            return reference.moe_ffn(x, weights, ids, gate, up, down)
        grouped = moe.plan(ids, gate.shape[0])
        gate_out, up_out = _gate_up(lambda w: grouped_linear(x, grouped, w, pdl=pdl), gate, up)
        act = ops.swiglu(gate_out, up_out)
        return combine(grouped_linear(act, grouped, down, pdl=pdl), weights)

    composed = {"moe_ffn": moe_ffn}
    if ops.norm_quant:
        composed.update(norm_quant(ops))
    return composed


def _gate_up(linear, gate, up):
    """The slots' gate and up rows [T*k, F] each: a merged gate/up [n_expert, 2F, n_embd] (up
    None) in one mat-mul, halved; else one each."""
    if up is None:
        return linear(gate).chunk(2, dim=-1)
    return linear(gate), linear(up)


def check_kv_cache_types(k_type, v_type) -> None:
    """The attention kernels read K and V each in q8_0 or q4_0 blocks (dequantized in the kernel) or
    in a float dtype (f16, bf16, f32), the two float ones of one dtype: two different float
    types are refused with what to use instead."""
    from kiln.errors import UsageError

    if not k_type.quantized and not v_type.quantized and k_type != v_type:
        raise UsageError(
            f"the triton backend's attention kernels read float K and V of one type, got K "
            f"{k_type.name} and V {v_type.name}: give -ctk and -ctv the same float type (or "
            f"either of them q8_0 or q4_0)"
        )


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
    "linear": "mat-vec at 1 row; 2..8 rows: kiln.kernels.linear.batch_method (by format: the "
    "one-row mat-vec once a row, the byte mat-vec or the exact GEMM); quantized GEMM above "
    "(tensor cores, bf16 activations); F32 weights above 8 rows and other formats: the "
    "reference (fp32)",
    "rms_norm": "kernel",
    "add_rms_norm": "kernel",
    "qk_norm": "kernel",
    "qkv_norm_rope": "kernel (norm, RoPE, paged K/V write)",
    "rope": "reference (only the unfused qkv_norm_rope calls it)",
    "attention": "flash-decoding kernel over the paged pool for one query per sequence; "
    "flash attention kernel over the pool for prompts",
    "swiglu": "kernel",
    "moe_route": "kernel up to 8 rows; reference above",
    "moe_ffn": "per-row expert mat-vec kernels + combine kernel up to 8 rows; above, the "
    "slots sorted by expert on the device and the grouped GEMM (moe_grouped) + combine kernel",
}
# What norm_quant changes (kiln fusions / kiln info print it when it is on).
NORM_QUANT_ROUTES = {
    "rms_norm": "kernel; with norm_quant and decode rows (<= 8) read by int8 mat-vecs: norm + "
    "quantize to q8_1 in one kernel",
    "add_rms_norm": "kernel; with norm_quant and decode rows (<= 8) read by int8 mat-vecs: add + "
    "norm + quantize to q8_1 in one kernel",
    "swiglu": "kernel; with norm_quant and decode rows (<= 8) whose down weight an int8 mat-vec "
    "reads: swiglu + quantize to q8_1 in one kernel",
    "linear": ROUTES["linear"]
    + "; with norm_quant, decode rows of Q8_0/Q4_x/Q5_x/Q4_K/Q5_K/Q6_K weights: "
    "the int8 (dp4a) mat-vec on q8_1 activations (float rows of 2..8, the attention's "
    "output, quantized by a launch of their own first)",
    "moe_ffn": ROUTES["moe_ffn"]
    + "; with norm_quant, decode rows of experts the int8 mat-vec reads: its expert variant "
    "on q8_1 rows (gate/up from the FFN norm, down from SwiGLU + quantize in one kernel)",
}
