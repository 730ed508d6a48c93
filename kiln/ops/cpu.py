"""The "cpu" backend: the default on a CPU. Weights stay quantized (kiln/ops/cpu_pack.py: packed
at load into torch's int4 CPU kernel's layout, or dequantized per call in chunks), and the
decode path is made of few torch calls, because a small model's step is bound by their count.

Compared with the reference (which stays the spec and the oracle, `--backend torch`):
- linear: activations rounded to bfloat16 and results to bfloat16 for the packed formats (the
  quality gate: mean KL divergence against the reference, docs/performance.md); the output
  projection's largest outputs recomputed in float32; F32 weights run the same float32 matmul
  as the reference. A tied embedding reads its rows from the output projection's packed form.
- attention of one query row (decode): two batched mat-muls over the KV heads and a softmax,
  without the general scaled_dot_product_attention call (20 ms a call for stories260K's head
  size of 8 on this machine's torch build) and without repeating K and V per query head.
  Prompts: the same batched mat-muls with the causal mask, in passes of query rows that keep
  the scores near 8 MB (scaled_dot_product_attention would map 4 MB more of torch's code).
- RoPE: cos/sin tables computed once per frequency vector (same formula as the reference); a
  decode step rotates by one [D, D] matrix (a small mat-mul a layer), prompts by the
  reference's own products with rows of the tables (real arithmetic only: complex kernels
  mapped 3 MB more of torch's code); Q and K rotated in one call when they are adjacent in the
  merged QKV result.
- RMSNorm of one row: a dot product and one addcmul.
- MoE: the reference ops (experts dequantized one at a time per call).
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from gguf.constants import GGMLQuantizationType

from kiln.errors import UsageError
from kiln.ops import cpu_pack, reference
from kiln.quant.kv import rotated_like, write_rows
from kiln.weight import Weight


def pack_for_kernel(weights: dict[str, Weight], groups: Sequence[Sequence[str]] = ()) -> None:
    """Give every weight its cpu form, before the model merges any (merged weights then join
    the parts' forms, never a copy of their blocks). `groups`: the weights the model will merge
    (Q, K, V; gate, up), packed side by side so that the merge is the group's form as it is.
    All planes come from one allocation (cpu_pack.Arena). Vectors (norms, biases) get a float32 copy
    of their values (kilobytes) and their file pages are given back: the kernel maps a file in
    large folios, and reading one norm weight there once mapped 2 MB (measured: 48 MB for the
    demo model's 61 norms). F32 matrices are used in place (a view of the file). An untied token
    embedding is only read a row at a time, from its blocks, so it is not packed."""
    cpu_pack.scan_file_mappings()
    cpu_pack.release_code_pages()
    tied = "output.weight" not in weights
    matrices = {}
    for name, w in weights.items():
        if w.device.type != "cpu":
            continue
        if len(w.shape) == 1:
            if w._dense is None:
                w._dense = w.dense().clone()
                cpu_pack.release_pages(w.raw)
        elif w.qtype == GGMLQuantizationType.F32 and w._dense is None:
            w._dense = cpu_pack.f32_view(w)
        if len(w.shape) == 2 and (name != "token_embd.weight" or tied):
            matrices[name] = w
    units = []
    for names in groups:
        ws = [matrices.get(n) for n in names]
        if all(w is not None for w in ws) and _groupable(ws):
            units.append(ws)
            for n in names:
                del matrices[n]
    singles = list(matrices.values())
    head = "token_embd.weight" if tied else "output.weight"
    packed_bytes = sz_values = 0
    for w in [*[_stacked(ws) for ws in units], *singles]:
        if cpu_pack.packable(w) and not cpu_pack.as_int8_blocks(w, w.name == head):
            nb, ns = cpu_pack.plane_bytes(w)
            planes = cpu_pack.n_planes(w.qtype)
            packed_bytes, sz_values = packed_bytes + planes * nb, sz_values + planes * ns
    arena = cpu_pack.Arena(packed_bytes, sz_values)
    for ws in units:
        cpu_pack.pack_group(ws, arena)
    for w in singles:
        w.packed = cpu_pack.pack(w, arena, exact=w.name == head)


def _groupable(ws: list[Weight]) -> bool:
    """One format and width, all packed as planes, every part but the last whole row blocks."""
    return (
        all(cpu_pack.packable(w) for w in ws)
        and len({(w.qtype, w.shape[1]) for w in ws}) == 1
        and all(w.shape[0] % cpu_pack.ROW_ALIGN == 0 for w in ws[:-1])
    )


def _stacked(ws: list[Weight]) -> Weight:
    """A stand-in of a group's shape (for the arena's size)."""
    n = sum(w.shape[0] for w in ws)
    return Weight("group", ws[0].qtype, (n, ws[0].shape[1]), None)


def embedding(weight: Weight, ids: torch.Tensor) -> torch.Tensor:
    """ids: [T] -> float32 [T, n_embd]. A tied embedding (the output projection, packed with its
    exact scales) gives its rows from the packed form: the same values (Q8_0 bit-exact), and
    the GGUF's pages stay unmapped (each row read there mapped a large folio of the file)."""
    form = weight.packed
    if form is not None and getattr(form, "exact", None) is not None and ids.dim() == 1:
        return form.rows(ids)
    return reference.embedding(weight, ids)


def linear(x: torch.Tensor, weight: Weight, bias: Weight | None = None) -> torch.Tensor:
    """x: [T, n_in] -> float32 [T, n_out]."""
    form = weight.packed
    if form is None:
        return reference.linear(x, weight, bias)
    y = form.linear(x if x.dtype == torch.float32 else x.float())
    return y if bias is None else y + bias.dense()


def rms_norm(x: torch.Tensor, weight: Weight, eps: float) -> torch.Tensor:
    """The reference's x * rsqrt(mean(x^2) + eps) * weight: one row (decode) as a dot product,
    the scale on the host and one addcmul, 0 + scale * x * weight in the reference's order
    (4.8 us against 5.9 for a multiply by the weight and one by the scale, and F.rms_norm's
    10 us: 61 norms a token on the demo model); more rows in F.rms_norm."""
    w = weight.dense()
    n = w.shape[-1]
    if x.dtype == torch.float32 and x.dim() == 2 and x.shape[0] == 1 and x.is_contiguous():
        v = x.view(-1)
        scale = 1.0 / math.sqrt(torch.dot(v, v).item() / n + eps)
        return torch.addcmul(_ZERO, x, w, value=scale)
    return F.rms_norm(x if x.dtype == torch.float32 else x.float(), (n,), w, eps)


# baddbmm's ignored input (beta = 0: scores and scale in one call) and the one-row RMSNorm's
# addcmul's (0 + ...): a 0-dim zero, broadcast to any shape
_ZERO = torch.zeros(())


def add_rms_norm(x, residual, weight, eps):
    h = residual + x
    return h, rms_norm(h, weight, eps)


def qk_norm(q, k, q_weight, k_weight, eps):
    return rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)


class _RopeTable:
    """cos and sin of position * freq for positions 0..capacity-1 of one frequency vector (the
    reference's angles, computed once), and the rotation of one position as a [D, D] matrix
    (decode: every layer of a step rotates by it, one small mat-mul each). Real arithmetic only:
    complex kernels would map about 3 MB more of torch's code into the process (kiln run's
    peak RSS)."""

    __slots__ = ("freqs", "cos", "sin", "last", "where", "spread")

    def __init__(self, freqs: torch.Tensor):
        self.freqs = weakref.ref(freqs)
        self.cos = self.sin = torch.empty(0, freqs.numel(), device=freqs.device)
        self.last: tuple[tuple[int, int, bool], torch.Tensor] | None = None
        self.where: dict[tuple[int, bool], torch.Tensor] = {}
        # neox -> (cos, sign * sin) [capacity, rot] laid out as the rotated dims are (prompts)
        self.spread: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}

    def matrix(self, freqs: torch.Tensor, p: int, d: int, neox: bool) -> torch.Tensor:
        """float32 [d, d] M with x @ M = the reference's rope of x at position p: for a pair
        (a, b) of dims (i, j), out_i = a cos - b sin, out_j = a sin + b cos; the dims past
        the rotated ones kept."""
        key = (p, d, neox)
        if self.last is not None and self.last[0] == key:
            return self.last[1]
        if p >= self.cos.shape[0]:
            self.grow(freqs, p + 1)
        c, s = self.cos[p], self.sin[p]
        flat = self.where.get((d, neox))
        if flat is None:
            half = c.shape[0]
            i = torch.arange(half) if neox else 2 * torch.arange(half)
            j = i + half if neox else i + 1
            # M[i, i] = cos, M[j, i] = -sin, M[i, j] = sin, M[j, j] = cos
            flat = self.where[d, neox] = torch.cat([i * d + i, j * d + i, i * d + j, j * d + j])
        m = torch.eye(d, device=c.device)
        m.view(-1)[flat] = torch.cat([c, -s, s, c])
        self.last = (key, m)
        return m

    def grow(self, freqs: torch.Tensor, need: int) -> None:
        cap = max(need, 2 * self.cos.shape[0], 256)
        positions = torch.arange(cap, device=freqs.device)
        angles = positions.to(torch.float32)[:, None] * freqs[None, :]  # as the reference
        self.cos, self.sin = torch.cos(angles), torch.sin(angles)
        self.spread = {}

    def rows(self, freqs: torch.Tensor, positions: torch.Tensor, neox: bool):
        """-> (c, s) float32 [T, 1, rot] of the positions, over the rotated dims in their order:
        neox (i, i + rot / 2): c = (cos, cos), s = (-sin, sin); else pairs (2i, 2i + 1): c =
        cos and s = (-sin, sin) interleaved. Then x * c + partner(x) * s is the reference's
        a cos - b sin, b cos + a sin (partner: each dim's other half of its pair)."""
        if int(positions.max()) >= self.cos.shape[0]:
            self.grow(freqs, int(positions.max()) + 1)
        spread = self.spread.get(neox)
        if spread is None:
            if neox:
                c = torch.cat((self.cos, self.cos), dim=-1)
                sn = torch.cat((-self.sin, self.sin), dim=-1)
            else:
                c = self.cos.repeat_interleave(2, dim=-1)
                sn = torch.stack((-self.sin, self.sin), dim=-1).flatten(-2)
            spread = self.spread[neox] = (c, sn)
        return spread[0][positions, None], spread[1][positions, None]


_TABLES: dict[int, _RopeTable] = {}


def _table(freqs: torch.Tensor) -> _RopeTable:
    t = _TABLES.get(id(freqs))
    if t is None or t.freqs() is not freqs:
        t = _TABLES[id(freqs)] = _RopeTable(freqs)
        weakref.finalize(freqs, _TABLES.pop, id(freqs), None)  # the model is gone: so is this
    return t


def rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, neox: bool) -> torch.Tensor:
    """The reference's rotation (x: [T, heads, D]): one position as a mat-mul by its rotation
    matrix, several (prompts) bit for bit as the reference computes them, from rows of the
    cached tables (_RopeTable.rows)."""
    rot = 2 * freqs.numel()
    table = _table(freqs)
    if x.dtype != torch.float32:
        x = x.float()
    if positions.shape[0] == 1 and x.dim() == 3:
        m = table.matrix(freqs, int(positions.item()), x.shape[-1], neox)
        return torch.matmul(x, m)
    c, s = table.rows(freqs, positions, neox)  # [T, 1, rot]
    xr = x[..., :rot] if rot < x.shape[-1] else x
    if neox:  # each dim's partner: the other half
        partner = torch.cat((xr[..., rot // 2 :], xr[..., : rot // 2]), dim=-1)
    else:  # the other dim of its pair (a stack of the strided halves: 218 us for 512 x 12 x 64
        # against flip's 364)
        pairs = xr.reshape(*xr.shape[:-1], rot // 2, 2)
        partner = torch.stack((pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    # a c + b (-s) = a c - b s and b c + a s: the reference's products and sums, bit for bit
    out = (xr * c).add_(partner.mul_(s))
    return torch.cat((out, x[..., rot:]), dim=-1) if rot < x.shape[-1] else out


def qkv_norm_rope(
    q, k, v, q_weight, k_weight, eps, positions, slots, freqs, neox, k_cache, v_cache
):
    """The reference's op (RoPE at positions, K/V into pool rows slots); Q and K rotated in one
    call when k directly follows q in memory (views of one merged QKV result) and no per-head
    norm comes first."""
    if q_weight is not None:
        q, k = qk_norm(q, k, q_weight, k_weight, eps)
    both = _adjacent_heads(q, k)
    if both is not None:
        qk = rope(both, positions, freqs, neox)
        q, k = qk[:, : q.shape[1]], qk[:, q.shape[1] :]
    else:
        q = rope(q, positions, freqs, neox)
        k = rope(k, positions, freqs, neox)
    write_rows(k_cache, slots, k)
    write_rows(v_cache, slots, v)
    return rotated_like(q, k_cache)


def _adjacent_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """[T, H + Hkv, D]: one view of q's heads followed by k's, when memory allows it."""
    if (
        q.dtype != k.dtype
        or q.shape[0] != k.shape[0]
        or q.shape[2] != k.shape[2]
        or (q.shape[0] > 1 and q.stride(0) != k.stride(0))
        or k.stride(1) != q.stride(1)
        or k.stride(2) != 1
        or q.stride(2) != 1
        or q.stride(1) != q.shape[2]
        or k.data_ptr() != q.data_ptr() + q.shape[1] * q.shape[2] * q.element_size()
    ):
        return None
    try:  # checked against q's storage: k adjacent in memory yet in another one fails here
        return q.as_strided((q.shape[0], q.shape[1] + k.shape[1], q.shape[2]), q.stride())
    except RuntimeError:
        return None


def attention(q: torch.Tensor, k_pool, v_pool, batch, scale: float) -> torch.Tensor:
    """The reference's attention over the paged pool (kiln.ops.reference.attention), each
    sequence's keys a slice of the pool where its blocks are consecutive (the usual case). The
    decode step of one such sequence reads its slice directly: per_sequence's slices of the
    queries and positions and its loop cost 4 us a layer, 0.1 ms a token on the demo model.
    The output is rotated back where V's rows are stored rotated, as the reference's."""
    if batch.query_lens == (1,) and batch.first_rows[0] is not None:
        first, length = batch.first_rows[0], batch.kv_lens[0]
        end = first + length
        out = _one_query(q, k_pool[first:end], v_pool[first:end], length, scale)
    else:
        out = reference.per_sequence(
            q, k_pool, v_pool, batch, lambda qs, k, v, pos: _causal(qs, k, v, pos, scale)
        )
    return rotated_like(out, v_pool)


def _causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor, scale: float
) -> torch.Tensor:
    """The reference's causal attention (q: [T, H, D]; k: [S, Hkv, D]; v: [S, Hkv, Dv]) of one
    sequence whose last query sees every key."""
    if q.shape[0] == 1:
        return _one_query(q, k, v, k.shape[0], scale)
    t, n_head, d = q.shape
    n_kv = k.shape[1]
    g = n_head // n_kv
    k, v = k.float(), v.float()
    kt, vt = k.permute(1, 2, 0), v.permute(1, 0, 2)  # [Hkv, D, S], [Hkv, S, Dv]
    key_pos = torch.arange(k.shape[0], device=q.device)
    # query rows per pass: the scores [Hkv, G * rows, S] stay near 8 MB
    rows = max(1, ATTENTION_SCORES // (n_head * k.shape[0]))
    out = torch.empty(t, n_head, v.shape[2], dtype=torch.float32, device=q.device)
    for s in range(0, t, rows):
        qs = q[s : s + rows].float()  # [t', H, D]
        n = qs.shape[0]
        qg = qs.permute(1, 0, 2).reshape(n_kv, g * n, d)  # head h = kv * G + j: rows j * t' + i
        scores = torch.bmm(qg, kt).mul_(scale).view(n_kv, g, n, -1)
        masked = key_pos[None, :] > q_positions[s : s + rows, None]  # [t', S]
        scores.masked_fill_(masked, float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(n_kv, g * n, -1)
        res = torch.bmm(probs, vt).view(n_kv, g, n, -1)  # [Hkv, G, t', Dv]
        out[s : s + n] = res.permute(2, 0, 1, 3).reshape(n, n_head, -1)
    return out


ATTENTION_SCORES = 1 << 21  # float32 scores per pass of prompt attention (8 MB)


def _one_query(q, k, v, length: int, scale: float) -> torch.Tensor:
    """q: [1, H, D] over the first `length` keys -> float32 [1, H, Dv]; the H / Hkv query heads
    of a KV head read it in one mat-mul (head h uses KV head h // (H / Hkv), as the reference)."""
    n_head, n_kv, d = q.shape[1], k.shape[1], q.shape[2]
    if length != k.shape[0]:
        k, v = k[:length], v[:length]
    q = q.reshape(n_kv, n_head // n_kv, d)
    if k.dtype != torch.float32:  # f16/bf16 or quantized rows (kiln/quant/kv.py) -> float32
        k = k.float()
    if v.dtype != torch.float32:
        v = v.float()
    if q.dtype != torch.float32:
        q = q.float()
    scores = torch.baddbmm(_ZERO, q, k.permute(1, 2, 0), beta=0, alpha=scale)  # [Hkv, G, S]
    out = torch.bmm(torch.softmax(scores, dim=-1), v.permute(1, 0, 2))  # [Hkv, G, Dv]
    return out.reshape(1, n_head, v.shape[2])


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (
        F.silu(gate) * up
        if gate.dtype == up.dtype == torch.float32
        else F.silu(gate.float()) * up.float()
    )


def moe_route(x, router, n_used, normalize):
    return reference.moe_select(linear(x, router), n_used, normalize)


def loaded() -> None:
    cpu_pack.trim_heap()  # the load's temporaries
    cpu_pack.release_code_pages()  # the code the load ran: mapped again where used


def ops(pdl: bool = False) -> dict:
    return {
        "embedding": embedding,
        "linear": linear,
        "rms_norm": rms_norm,
        "add_rms_norm": add_rms_norm,
        "qk_norm": qk_norm,
        "qkv_norm_rope": qkv_norm_rope,
        "rope_frequencies": reference.rope_frequencies,
        "rope": rope,
        "attention": attention,
        "swiglu": swiglu,
        "moe_route": moe_route,
        "moe_ffn": reference.moe_ffn,
    }


ROUTES = {
    "embedding": "packed rows dequantized per lookup",
    "linear": "torch int4 mat-mul (4-bit formats), F32/BF16 torch.mm, others dequantized in chunks",
    "rms_norm": "torch",
    "add_rms_norm": "torch",
    "qk_norm": "torch",
    "qkv_norm_rope": "torch (cached RoPE tables)",
    "rope": "torch (cached RoPE tables)",
    "attention": "torch: one query as two batched mat-muls, prompts in 8 MB passes",
    "swiglu": "torch",
    "moe_route": "reference",
    "moe_ffn": "reference",
}


# ---------------------------------------------------------------------------------------------
# threads


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthreads not counted): distinct (package,
    core) pairs of the CPUs in its affinity mask, from sysfs; else the CPU count."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no affinity mask or sysfs topology to read
        return max(1, os.cpu_count() or 1)
    cores = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            pkg = (topo / "physical_package_id").read_text().strip()
            core = (topo / "core_id").read_text().strip()
        except OSError:
            return max(1, len(cpus))
        cores.add((pkg, core))
    return max(1, len(cores))


def set_threads(threads: int | None) -> int:
    """torch's intra-op threads: `threads`, or the physical cores when None -> the count set."""
    if threads is None:
        threads = physical_cores()
    elif isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UsageError(f"the thread count must be an integer >= 1, got {threads!r}")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
