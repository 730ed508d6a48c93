# K-quants: super-blocks of 256 values (QK_K) split into sub-blocks, with per-sub-block scales
# that are themselves quantized against one or two f16 super-block scales. f16 fields are
# little-endian; "q" below is the stored integer of one value.
#
# Q2_K: 256 values / 84 B (scales:16 B, qs:64 B of 2-bit, d:f16, dmin:f16)
#   16 sub-blocks of 16. scales[j] = sc | m << 4 (4-bit each).
#   qs byte 32*h + l holds value 128*h + 32*k + l in bits 2k..2k+1 (k = 0..3).
#   x = (d * sc) * q - (dmin * m)
# Q3_K: 256 values / 110 B (hmask:32 B, qs:64 B of low 2 bits, scales:12 B of 6-bit, d:f16)
#   16 sub-blocks of 16. Low 2 bits of q as Q2_K's qs; bit k of hmask[l] is the high bit of
#   value 32*k + l, and a *clear* bit subtracts 4: q = low2 - 4 * (1 - hbit), q in [-4, 3].
#   scale j (6 bits s, stored offset by 32): low 4 bits in nibble j // 8 of byte j % 8, high
#   2 bits at bit 2 * (j // 4) of byte 8 + j % 4. x = (d * (s - 32)) * q
# Q4_K: 256 values / 144 B (d:f16, dmin:f16, scales:12 B of 6-bit, qs:128 B of nibbles)
#   8 sub-blocks of 32, each with a 6-bit scale sc and 6-bit min m packed in 12 bytes:
#     j < 4: sc = s[j] & 63, m = s[j+4] & 63
#     j >= 4: sc = (s[j+4] & 15) | (s[j-4] >> 6) << 4, m = (s[j+4] >> 4) | (s[j] >> 6) << 4
#   qs byte 32*c + l: low nibble = value 64*c + l, high nibble = value 64*c + 32 + l.
#   x = (d * sc) * q - (dmin * m)
# Q5_K: 256 values / 176 B (d:f16, dmin:f16, scales:12 B as Q4_K, qh:32 B, qs:128 B of nibbles)
#   low 4 bits as Q4_K's qs; bit j of qh[l] is bit 4 of value 32*j + l (sub-block j).
#   x = (d * sc) * q - (dmin * m), q in [0, 31]
# Q6_K: 256 values / 210 B (ql:128 B of nibbles, qh:64 B of 2-bit, scales:16 B of int8, d:f16)
#   16 sub-blocks of 16 with int8 scales. For half h (128 values) and l < 32:
#     ql[64h + l] = v0 & 15 | (v64 & 15) << 4, ql[64h + 32 + l] = v32 & 15 | (v96 & 15) << 4,
#     qh[32h + l] = v0 >> 4 | (v32 >> 4) << 2 | (v64 >> 4) << 4 | (v96 >> 4) << 6
#   where vk is the stored 6-bit value 128h + k + l. x = (d * scale) * (q - 32)
#
# Dequantization follows gguf.quants (numpy, float32) operation by operation, so it is bit-exact.
# Quantization (Q4_K, Q5_K, Q6_K) follows llama.cpp's reference quantizers without an importance
# matrix (quantize_row_q{4,5,6}_K_ref in ggml-quants.c), including their float32 operation order:
# sums run left to right as the C loops do, rounding is ggml's nearest_int bit trick, and the
# scale searches are sequential over the grid because each step starts from the best min so far.
# That reproduces llama-quantize's blocks byte for byte: all 103,680 blocks per type of
# SmolLM2-135M's ffn_down weights and of as many synthetic stress blocks, on CPU and on CUDA
# (scripts/kquant_rmse.py; tests/quant/test_k_quants.py pins 102 of them).

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType

from kiln.quant import register_format

QK_K = 256
# ggml's GROUP_MAX_EPS (1e-15f): a group whose largest |x| is below it is stored as zeros.
_GROUP_MAX_EPS = float(np.float32(1e-15))
# Blocks quantized per pass: bounds the working memory (about 40 temporaries of
# chunk * 256 float32) for big tensors; every pass is vectorized over its blocks.
_CHUNK_BLOCKS = 16384


# ---------------------------------------------------------------------------------------------
# helpers


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """raw: uint8 [B, 2] (one little-endian f16) -> float32 [B, 1]."""
    return raw.contiguous().view(torch.float16).to(torch.float32)


def _f16_bytes(h: torch.Tensor) -> torch.Tensor:
    """h: float16 [B] -> uint8 [B, 2] (little-endian, as stored)."""
    return h.reshape(-1, 1).contiguous().view(torch.uint8)


def _shifts(values: list[int], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return _shift_table(tuple(values), shape, device)


@cache
def _shift_table(values: tuple[int, ...], shape: tuple[int, ...], device) -> torch.Tensor:
    """Made once per device: a host-to-device copy cannot happen inside a CUDA-graph capture."""
    return torch.tensor(values, dtype=torch.uint8, device=device).reshape(shape)


def _const(v: float, like: torch.Tensor) -> torch.Tensor:
    """A float32 0-dim tensor on like's device. Used as a numerator: `c / t` on a tensor computes
    t.reciprocal() * c, which rounds twice and would not match the C code's single division."""
    return torch.tensor(v, dtype=torch.float32, device=like.device)


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 exactly as ggml's nearest_int: add 1.5 * 2^23 and read the mantissa.
    That is round-half-even for |v| < 2^22; beyond it (or for inf/NaN) the result is the same
    garbage as in C, which the callers clamp as C does. Works in place: v must be a temporary."""
    return v.add_(12582912.0).view(torch.int32).bitwise_and_(0x7FFFFF).sub_(0x400000)


def _seq_sum(v: torch.Tensor) -> torch.Tensor:
    """v: [n, *rest] -> [*rest], summed v[0] + v[1] + ... in float32 in that order, as the C
    loops do (torch.sum's pairwise/vectorized order rounds differently)."""
    if v.shape[0] == 1:
        return v[0].clone()
    acc = v[0] + v[1]
    for i in range(2, v.shape[0]):
        acc.add_(v[i])
    return acc


def _chunked(fn: Callable[[torch.Tensor], torch.Tensor], values: torch.Tensor) -> torch.Tensor:
    if values.shape[0] <= _CHUNK_BLOCKS:
        return fn(values)
    return torch.cat([fn(c) for c in values.split(_CHUNK_BLOCKS)])


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scales: uint8 [B, 12] -> (sc, m) uint8 [B, 8] each (the 6-bit Q4_K/Q5_K packing)."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """ls, lm: int [B, 8] in [0, 63] -> uint8 [B, 12]."""
    lo = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mo = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    hi = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat([lo, mo, hi], dim=-1).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# quantization (llama.cpp's reference quantizers, no importance matrix)


def _make_qkx2_quants(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qkx2_quants (use_mad=false) on many groups at once: x ≈ scale * L - the_min.

    x, w: float32 [n, G] (element axis first, so each element's slice is contiguous).
    Returns scale [G], the_min [G] and L int32 [n, G] in [0, nmax].
    """
    mn0 = x.amin(0).clamp(max=0.0)
    mx = x.amax(0)
    flat = mx == mn0
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)

    mn = mn0
    iscale = _const(float(nmax), x) / (mx - mn)
    scale = _const(1.0, x) / iscale
    L = _nearest_int(iscale * (x - mn)).clamp_(0, nmax)
    diff = scale * L.to(torch.float32) + mn - x
    best = _seq_sum(w * (diff * diff))

    terms = x.new_empty(x.shape[0], 3, x.shape[1])  # w*l, w*l*l, w*l*x: summed together
    f32 = np.float32
    for step in range(nstep + 1):
        # (rmin + rdelta*is + nmax) in float32, as the C expression.
        num = float(f32(rmin) + f32(rdelta) * f32(step) + f32(nmax))
        # min is the best fit so far: C reads the updated variable on every step.
        iscale = _const(num, x) / (mx - mn)
        la = _nearest_int(iscale * (x - mn)).clamp_(0, nmax)
        lf = la.to(torch.float32)
        torch.mul(w, lf, out=terms[:, 0])
        torch.mul(terms[:, 0], lf, out=terms[:, 1])
        torch.mul(terms[:, 0], x, out=terms[:, 2])
        sum_l, sum_l2, sum_xl = _seq_sum(terms).unbind(0)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        clip = this_min > 0
        this_min = torch.where(clip, 0.0, this_min)
        this_scale = torch.where(clip, sum_xl / sum_l2, this_scale)
        diff = this_scale * lf + this_min - x
        err = _seq_sum(w * (diff * diff))
        better = (D > 0) & (err < best)
        L = torch.where(better, la, L)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)

    L = torch.where(flat, 0, L)
    scale = torch.where(flat, 0.0, scale)
    mn = torch.where(flat, mn0, mn)
    return scale, -mn, L


def _quantize_k_min(values: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """The shared part of quantize_row_q4_K_ref / q5_K_ref.

    values: float32 [B, 256] -> (d f16 bytes [B, 2], dmin f16 bytes [B, 2], scales uint8 [B, 12],
    L int32 [B, 8, 32] in [0, nmax]).
    """
    n = values.shape[0]
    x = values.reshape(n * 8, 32).t().contiguous()  # [32, G]: one column per sub-block
    sum_x2 = _seq_sum(x * x)
    # sqrtf: torch's float32 sqrt on CPU (AVX512, Sleef) is not correctly rounded (about 0.6%
    # of 20M random floats differ by an ulp); float64 sqrt rounded to float32 is, as sqrtf.
    av_x = torch.sqrt((sum_x2 / _const(32.0, x)).double()).to(torch.float32)
    w = av_x + x.abs()
    scales, mins, L = _make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    L = L.t().reshape(n, 8, 32)

    # max over sub-blocks starting from 0 with a strict '>', as C (also skips NaN).
    max_scale = torch.where(scales > 0, scales, 0.0).amax(1)
    max_min = torch.where(mins > 0, mins, 0.0).amax(1)
    c63 = _const(63.0, values)
    inv_scale = torch.where(max_scale > 0, c63 / max_scale, 0.0)
    inv_min = torch.where(max_min > 0, c63 / max_min, 0.0)
    # (uint8_t) nearest_int(...) then MIN(63, .)
    ls = (_nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp(max=63)
    lm = (_nearest_int(inv_min[:, None] * mins) & 0xFF).clamp(max=63)
    # GGML_FP32_TO_FP16 rounds to nearest even, as torch does.
    d16 = (max_scale / torch.full_like(max_scale, 63.0)).to(torch.float16)
    dmin16 = (max_min / torch.full_like(max_min, 63.0)).to(torch.float16)

    # Re-quantize every value against the scales as stored.
    d = d16.to(torch.float32)[:, None] * ls.to(torch.float32)  # [B, 8]
    dm = dmin16.to(torch.float32)[:, None] * lm.to(torch.float32)
    xb = values.reshape(n, 8, 32)
    lq = _nearest_int((xb + dm[..., None]) / d[..., None]).clamp(0, nmax)
    L = torch.where((d != 0)[..., None], lq, L)  # C: `if (!d) continue;` keeps the search's L

    return _f16_bytes(d16), _f16_bytes(dmin16), _pack_scale_min_k4(ls, lm), L


def _pack_nibbles_k4(L: torch.Tensor) -> torch.Tensor:
    """L: int [B, 8, 32] (low 4 bits used) -> uint8 [B, 128]: byte 32c + l holds sub-blocks
    2c (low nibble) and 2c + 1 (high nibble)."""
    lo = L[:, 0::2] & 0xF
    hi = L[:, 1::2] & 0xF
    return (lo | (hi << 4)).reshape(L.shape[0], 128).to(torch.uint8)


def _quantize_q4_k_chunk(values: torch.Tensor) -> torch.Tensor:
    d, dmin, scales, L = _quantize_k_min(values, 15, -1.0, 0.1, 20)
    return torch.cat([d, dmin, scales, _pack_nibbles_k4(L)], dim=1)


def _quantize_q5_k_chunk(values: torch.Tensor) -> torch.Tensor:
    d, dmin, scales, L = _quantize_k_min(values, 31, -0.5, 0.1, 15)
    bit = torch.arange(8, device=values.device, dtype=torch.int32).reshape(1, 8, 1)
    qh = ((L >> 4) << bit).sum(dim=1).to(torch.uint8)  # [B, 32]; disjoint bits, exact
    return torch.cat([d, dmin, scales, qh, _pack_nibbles_k4(L)], dim=1)


def _make_qx_quants_rmse1(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) on many groups at once.

    x: float32 [n, G]. Returns scale [G] and L int32 [n, G] in [0, 2*nmax - 1] (offset by nmax).
    """
    ax = x.abs()
    ax = torch.where(ax > 0, ax, 0.0)  # C starts amax at 0 and uses a strict '>'
    amax = ax.amax(0)
    idx = ax.argmax(0, keepdim=True)  # first of equal maxima, as the strict '>' in C
    mx = x.gather(0, idx)[0]  # the signed value of largest magnitude
    zero = amax < _GROUP_MAX_EPS

    w = x * x
    wx = w * x

    terms = x.new_empty(x.shape[0], 2, x.shape[1])  # w*x*l, w*l*l: summed together

    def fit(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lv = _nearest_int(iscale * x).clamp_(-nmax, nmax - 1)
        lf = lv.to(torch.float32)
        torch.mul(wx, lf, out=terms[:, 0])
        torch.mul(w, lf, out=terms[:, 1])
        terms[:, 1].mul_(lf)
        sumlx, suml2 = _seq_sum(terms).unbind(0)
        return lv, sumlx, suml2

    lv, sumlx, suml2 = fit(_const(-float(nmax), x) / mx)
    L = lv + nmax
    scale = torch.where(suml2 != 0, sumlx / suml2, 0.0)
    best = scale * sumlx
    f32 = np.float32
    for step in range(-9, 10):
        if step == 0:
            continue
        num = float(-(f32(nmax) + f32(0.1) * f32(step)))
        lv, sumlx, suml2 = fit(_const(num, x) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(better, lv + nmax, L)
        new_scale = sumlx / suml2
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * sumlx, best)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0, L)


def _quantize_q6_k_chunk(values: torch.Tensor) -> torch.Tensor:
    n = values.shape[0]
    x = values.reshape(n * 16, 16).t().contiguous()  # [16, G]: one column per sub-block
    scales, L = _make_qx_quants_rmse1(x, 32)
    scales = scales.reshape(n, 16)
    L = L.t().reshape(n, 16, 16)

    a = scales.abs()
    a = torch.where(a > 0, a, 0.0)
    max_abs = a.amax(1)
    max_scale = scales.gather(1, a.argmax(1, keepdim=True))[:, 0]
    zero = max_abs < _GROUP_MAX_EPS

    iscale = _const(-128.0, values) / max_scale
    d16 = (_const(1.0, values) / iscale).to(torch.float16)
    sc = _nearest_int(iscale[:, None] * scales).clamp(max=127)
    sc = ((sc + 128) & 0xFF) - 128  # (int8_t) conversion
    d = d16.to(torch.float32)[:, None] * sc.to(torch.float32)  # [B, 16]
    lq = _nearest_int(values.reshape(n, 16, 16) / d[..., None]).clamp(-32, 31) + 32
    L = torch.where((d != 0)[..., None], lq, L)  # C: `if (!d) continue;` keeps the search's L

    Lq = L.reshape(n, 2, 4, 32)  # [B, half, quarter, l]
    ql = (Lq[:, :, 0:2] & 0xF) | ((Lq[:, :, 2:4] & 0xF) << 4)  # [B, 2, 2, 32]
    bit = torch.tensor([0, 2, 4, 6], device=values.device, dtype=torch.int32).reshape(1, 1, 4, 1)
    qh = ((Lq >> 4) << bit).sum(dim=2)  # [B, 2, 32]; disjoint bits, exact
    out = torch.cat(
        [
            ql.reshape(n, 128).to(torch.uint8),
            qh.reshape(n, 64).to(torch.uint8),
            (sc & 0xFF).to(torch.uint8),
            _f16_bytes(d16),
        ],
        dim=1,
    )
    # C: memset(&y[i], 0, ...) for a block whose scales are all below GROUP_MAX_EPS.
    return torch.where(zero[:, None], 0, out).to(torch.uint8)


def _quantize_q4_k(values: torch.Tensor) -> torch.Tensor:
    # values: float32 [B, 256] -> uint8 [B, 144]
    return _chunked(_quantize_q4_k_chunk, values.to(torch.float32))


def _quantize_q5_k(values: torch.Tensor) -> torch.Tensor:
    # values: float32 [B, 256] -> uint8 [B, 176]
    return _chunked(_quantize_q5_k_chunk, values.to(torch.float32))


def _quantize_q6_k(values: torch.Tensor) -> torch.Tensor:
    # values: float32 [B, 256] -> uint8 [B, 210]
    return _chunked(_quantize_q6_k_chunk, values.to(torch.float32))


# ---------------------------------------------------------------------------------------------
# dequantization (bit-exact against gguf.quants)


@register_format(GGMLQuantizationType.Q2_K)
def _dequantize_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # blocks: uint8 [B, 84] -> float32 [B, 256]
    n = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    dl = (d * (scales & 0xF).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    shift = _shifts([0, 2, 4, 6], (1, 1, 4, 1), blocks.device)
    q = ((qs.reshape(n, 2, 1, 32) >> shift) & 3).reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


@register_format(GGMLQuantizationType.Q3_K)
def _dequantize_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # blocks: uint8 [B, 110] -> float32 [B, 256]
    n = blocks.shape[0]
    hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks[:, 108:110])
    dev = blocks.device
    lsc = (scales[:, :8].reshape(n, 1, 8) >> _shifts([0, 4], (1, 2, 1), dev)).reshape(n, 16)
    hsc = (scales[:, 8:].reshape(n, 1, 4) >> _shifts([0, 2, 4, 6], (1, 4, 1), dev)).reshape(n, 16)
    sc = ((lsc & 0x0F) | ((hsc & 0x03) << 4)).to(torch.int32) - 32
    dl = (d * sc.to(torch.float32)).reshape(n, 16, 1)
    ql = (qs.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), dev)) & 3
    qh = (hmask.reshape(n, 1, 1, 32) >> _shifts(list(range(8)), (1, 1, 8, 1), dev)) & 1
    q = ql.reshape(n, 16, 16).to(torch.int32) - ((qh.reshape(n, 16, 16) ^ 1).to(torch.int32) << 2)
    return (dl * q.to(torch.float32)).reshape(n, QK_K)


@register_format(GGMLQuantizationType.Q4_K, quantize=_quantize_q4_k)
def _dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # blocks: uint8 [B, 144] -> float32 [B, 256]
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, m = _scale_min_k4(blocks[:, 4:16])
    d = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (dmin * m.to(torch.float32)).reshape(n, 8, 1)
    qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> _shifts([0, 4], (1, 1, 2, 1), blocks.device)
    q = (qs & 0x0F).reshape(n, 8, 32).to(torch.float32)
    return (d * q - dm).reshape(n, QK_K)


@register_format(GGMLQuantizationType.Q5_K, quantize=_quantize_q5_k)
def _dequantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # blocks: uint8 [B, 176] -> float32 [B, 256]
    n = blocks.shape[0]
    dev = blocks.device
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, m = _scale_min_k4(blocks[:, 4:16])
    d = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (dmin * m.to(torch.float32)).reshape(n, 8, 1)
    ql = (blocks[:, 48:].reshape(n, 4, 1, 32) >> _shifts([0, 4], (1, 1, 2, 1), dev)) & 0x0F
    qh = (blocks[:, 16:48].reshape(n, 1, 1, 32) >> _shifts(list(range(8)), (1, 1, 8, 1), dev)) & 1
    q = (ql.reshape(n, 8, 32) | (qh.reshape(n, 8, 32) << 4)).to(torch.float32)
    return (d * q - dm).reshape(n, QK_K)


@register_format(GGMLQuantizationType.Q6_K, quantize=_quantize_q6_k)
def _dequantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # blocks: uint8 [B, 210] -> float32 [B, 256]
    n = blocks.shape[0]
    dev = blocks.device
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = (_f16(blocks[:, 208:210]) * scales).reshape(n, 16, 1)
    ql = (ql.reshape(n, 2, 1, 64) >> _shifts([0, 4], (1, 1, 2, 1), dev)) & 0x0F
    qh = (qh.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), dev)) & 0x03
    q = (ql.reshape(n, 8, 32) | (qh.reshape(n, 8, 32) << 4)).to(torch.int32) - 32
    return (d * q.reshape(n, 16, 16).to(torch.float32)).reshape(n, QK_K)
