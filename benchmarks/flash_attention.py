"""Micro-benchmark of prompt flash attention over the paged KV pool, in TFLOP/s.

kiln.kernels.flash_attention.attention_prefill: time per call and TFLOP/s for prompts of
--prompts tokens at --depths tokens already in the cache, beside torch's
scaled_dot_product_attention (flash backend) on the same keys laid out contiguous. Not run by CI;
needs a CUDA device.

    python benchmarks/flash_attention.py [--heads 32,8,128] [--prompts 512,2048]
                                         [--depths 0,4096] [--dtype bf16] [--q-dtype f32]
                                         [-B 1] [--block-size 64] [--shuffle] [--sweep]

Each call runs B sequences (-B) of `prompt` queries at positions depth .. depth + prompt - 1, each
over its own blocks of a paged pool (--block-size rows per block, handed out in pool order;
--shuffle permutes them), the chunk's K/V already in the pool, as the model calls it after
qkv_norm_rope. q is f32 by default (what qkv_norm_rope returns). TFLOP/s counts the useful work
only: 2 * H * (D + Dv) FLOPs per visible (query, key) pair (a query at position p sees p + 1
keys), not the masked parts of the diagonal blocks; torch is credited the same FLOPs. torch
runs bf16/f16 q, K, V [B, H(kv), L, D] contiguous with a lower-right causal mask (the prompt's
rows at the end of the keys; at depth 0 the usual causal mask), GQA through enable_gqa where the
flash backend takes it, else with K/V repeated to H heads (said in the output). Times are the
median of triton.testing.do_bench. --sweep also times a grid of launch configs at every size and
prints the best.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.testing

from kiln.kernels import flash_attention as fa

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}
# (block_r, block_n, num_warps, num_stages); block_n is capped at the block size.
SWEEP = (
    (128, 64, 8, 2),
    (128, 64, 8, 3),
    (128, 64, 8, 4),
    (128, 32, 8, 3),
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (64, 64, 4, 3),
    (64, 64, 4, 4),
    (64, 128, 4, 3),
    (64, 32, 4, 3),
    (128, 64, 4, 3),
    (256, 64, 8, 2),
)


def _time_us(fn) -> float:
    """Median time of fn, in us (triton's do_bench, as benchmarks/matmul.py and matvec.py)."""
    return 1e3 * float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


class Prompt:
    """B sequences of depth + n tokens in a paged pool; the last n of each are the queries."""

    def __init__(self, args, heads: tuple[int, int, int], n: int, depth: int):
        h, hkv, d = heads
        bs, b = args.block_size, args.batch
        dtype = DTYPES[args.dtype]
        length = depth + n
        need = -(-length // bs)
        n_blocks = b * need + 1
        self.k = torch.randn(n_blocks * bs, hkv, d, device="cuda").to(dtype)
        self.v = torch.randn(n_blocks * bs, hkv, d, device="cuda").to(dtype)
        order = torch.randperm(n_blocks - 1) + 1 if args.shuffle else torch.arange(1, n_blocks)
        self.tables = order.view(b, need).to(torch.int32).to("cuda")
        self.seq_lens = torch.full((b,), length, dtype=torch.int64, device="cuda")
        self.query_start = torch.arange(0, (b + 1) * n, n, dtype=torch.int64, device="cuda")
        self.positions = torch.arange(depth, length, device="cuda").repeat(b)
        self.q = torch.randn(b * n, h, d, device="cuda").to(DTYPES[args.q_dtype])
        self.n, self.depth, self.b, self.block_size = n, depth, b, bs
        self.scale = d**-0.5
        pairs = b * (n * depth + n * (n + 1) // 2)  # visible (query, key) pairs
        self.flops = 2 * h * 2 * d * pairs

    def call(self, cfg=None) -> torch.Tensor:
        return fa.attention_prefill(
            self.q, self.k, self.v, self.tables, self.seq_lens, self.query_start, self.positions,
            self.block_size, self.n, self.scale, cfg,
        )  # fmt: skip

    def contiguous(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, n, D] in the cache dtype, K and V [B, Hkv, depth + n, D]: the same values."""
        rows = (self.tables.long()[:, :, None] * self.block_size).flatten(1)
        rows = (rows[:, :, None] + torch.arange(self.block_size, device="cuda")).flatten(1)
        rows = rows[:, : self.depth + self.n]  # [B, L]
        k, v = (p[rows].transpose(1, 2).contiguous() for p in (self.k, self.v))
        q = self.q.to(self.k.dtype).view(self.b, self.n, *self.q.shape[1:])
        return q.transpose(1, 2).contiguous(), k, v


def sdpa(prompt: Prompt):
    """(function running torch's flash SDPA on the contiguous copy, note); None if it cannot."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    q, k, v = prompt.contiguous()
    n, length = q.shape[2], k.shape[2]
    mask = causal_lower_right(n, length) if length != n else None

    def run(q, k, v, gqa):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=prompt.scale,
                enable_gqa=gqa,
            )  # fmt: skip

    try:
        run(q, k, v, True)
        return (lambda: run(q, k, v, True)), "enable_gqa"
    except (RuntimeError, TypeError):
        pass
    group = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(group, dim=1).contiguous() for x in (k, v))
    try:
        run(q, k, v, False)
        return (lambda: run(q, k, v, False)), "K/V repeated to H heads"
    except (RuntimeError, TypeError) as e:  # enable_gqa needs torch >= 2.5
        return None, f"sdpa failed: {str(e).splitlines()[0][:60]}"


def bench(args, heads, n: int, depth: int) -> None:
    p = Prompt(args, heads, n, depth)
    y = p.call()
    ref = fa_reference(p)
    err = ((y - ref).abs().max() / ref.abs().max()).item()
    us = _time_us(p.call)
    line = f"{n:>6} {depth:>6} {us:9.1f} {p.flops / us / 1e6:8.1f}"
    run, note = sdpa(p)
    if run is not None:
        s_us = _time_us(run)
        line += f" {s_us:9.1f} {p.flops / s_us / 1e6:8.1f} {s_us / us:6.2f}x  ({note})"
    else:
        line += f"  {note}"
    print(line + f"  max err {err:.1e}", flush=True)
    if args.sweep:
        times = {}
        for r, bn, w, st in SWEEP:
            cfg = fa.FlashConfig(r, bn, w, st)
            try:
                times[(r, min(bn, p.block_size), w, st)] = _time_us(lambda cfg=cfg: p.call(cfg))
            except Exception as e:  # e.g. out of shared memory
                print(f"  {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
        best = min(times, key=times.get)
        row = "  ".join("/".join(map(str, c)) + f":{t:.0f}" for c, t in times.items())
        print(f"  sweep (block_r/block_n/warps/stages:us) {row}")
        print(f"  best {best}: {times[best]:.1f} us, {p.flops / times[best] / 1e6:.1f} TFLOP/s")


def fa_reference(p: Prompt) -> torch.Tensor:
    """The same attention in float32 through torch (math), [B * n, H, D]: a sanity check."""
    _, k, v = p.contiguous()
    q = p.q.float().view(p.b, p.n, *p.q.shape[1:]).transpose(1, 2)
    group = q.shape[1] // k.shape[1]
    k, v = (x.float().repeat_interleave(group, dim=1) for x in (k, v))
    keys = torch.arange(p.depth + p.n, device="cuda")
    mask = keys[None, :] <= torch.arange(p.depth, p.depth + p.n, device="cuda")[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, scale=p.scale)
    return out.transpose(1, 2).reshape(p.b * p.n, q.shape[1], -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default="32,8,128", help="H,Hkv,D (qwen3-8b, llama3-8b)")
    ap.add_argument("--prompts", default="512,2048", help="query tokens per sequence")
    ap.add_argument("--depths", default="0,4096", help="tokens already in the cache")
    ap.add_argument("-B", "--batch", type=int, default=1, help="sequences per call")
    ap.add_argument("--block-size", type=int, default=64, help="rows per KV-cache block")
    ap.add_argument("--shuffle", action="store_true", help="blocks in a random pool order")
    ap.add_argument("--dtype", default="bf16", choices=("f16", "bf16"), help="the cache's")
    ap.add_argument("--q-dtype", default="f32", choices=tuple(DTYPES))
    ap.add_argument("--sweep", action="store_true", help="also time a grid of launch configs")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "benchmarks/flash_attention.py needs a CUDA device"
    torch.manual_seed(0)
    heads = tuple(int(v) for v in args.heads.split(","))
    h, hkv, d = heads
    default = fa.default_config(d, d, DTYPES[args.dtype])
    print(f"{torch.cuda.get_device_name()}: H={h} Hkv={hkv} D={d} B={args.batch} {args.dtype} "
          f"cache, q {args.q_dtype}, block_size={args.block_size}"
          f"{' shuffled' if args.shuffle else ''}; default {default}")  # fmt: skip
    print(f"{'prompt':>6} {'depth':>6} {'us':>9} {'TFLOP/s':>8} {'sdpa us':>9} {'TFLOP/s':>8}")
    for n in (int(v) for v in args.prompts.split(",")):
        for depth in (int(v) for v in args.depths.split(",")):
            bench(args, heads, n, depth)


if __name__ == "__main__":
    main()
