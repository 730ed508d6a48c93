"""The norm_quant fusion (q8_1 activations for the int8 mat-vecs): its kernel against its unfused
form, the one decision of which form each consumer reads, the toggle, and the quality gate of the
decode path on tiny models (the demo model's gate, 512 tokens, is in tests/test_cuda_decode.py).

norm_quant is approximate: tokens may differ from the float path where logits nearly tie, so
the gate is the KL divergence of the next-token distributions, not token equality.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gguf.constants import GGMLQuantizationType

from kiln import quant
from kiln.gguf.synthetic import PRESETS
from kiln.gguf.synthetic import build_model as synthetic
from kiln.kernels import activation, norm
from kiln.models import build_model
from kiln.ops import get_ops
from kiln.quant.q8_1 import Activation
from kiln.runtime.engine import Engine
from kiln.weight import Weight

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
PROMPT = [1, 17, 42, 99, 7, 23, 5, 64, 200]
STEPS = 64 if CUDA else 3


def _norm_weight(n: int, gen: torch.Generator) -> Weight:
    w = torch.randn(n, generator=gen).contiguous()
    return Weight("n", GGMLQuantizationType.F32, (n,), w.view(torch.uint8).to(DEVICE))


@pytest.mark.parametrize("rows,n", [(1, 64), (3, 576), (8, 4096)])
@pytest.mark.parametrize("residual", (False, True), ids=("norm", "add_norm"))
def test_fused_kernel_equals_its_unfused_form(rows: int, n: int, residual: bool) -> None:
    """One launch (rms_norm_quant) against the add_rms_norm/rms_norm launch + the quantize
    launch: the same bits in h, the float rows and the q8_1 rows, with and without floats."""
    gen = torch.Generator().manual_seed(rows * n)
    w = _norm_weight(n, gen)
    x = torch.randn(rows, n, generator=gen).to(DEVICE)
    r = torch.randn(rows, n, generator=gen).to(DEVICE) if residual else None
    for write_y in (True, False):
        fused = norm.rms_norm_quant(x, w, 1e-6, r, write_y)
        unfused = norm.rms_norm_quant_unfused(x, w, 1e-6, r, write_y)
        for got, want, what in zip(fused[:2], unfused[:2], ("h", "y"), strict=True):
            assert (got is None) == (want is None), what
            assert got is None or torch.equal(got, want), f"{what} differs"
        assert torch.equal(fused[2].qs, unfused[2].qs) and torch.equal(fused[2].ds, unfused[2].ds)


@pytest.mark.parametrize("t,f", [(1, 64), (3, 1536), (2, 2144)])
def test_fused_swiglu_equals_its_unfused_form(t: int, f: int) -> None:
    """swiglu + quantize in one launch against the swiglu launch + the quantize launch, on the
    strided halves of a merged gate/up result (F = 2144: a last program of 96 columns)."""
    gu = torch.randn(t, 2 * f, generator=torch.Generator().manual_seed(f)).to(DEVICE)
    gate, up = gu[:, :f], gu[:, f:]
    for write_y in (True, False):
        y, q = activation.swiglu_quant(gate, up, write_y)
        y_u, q_u = activation.swiglu_quant_unfused(gate, up, write_y)
        assert (y is None) == (y_u is None) and (y is None or torch.equal(y, y_u))
        assert torch.equal(q.qs, q_u.qs) and torch.equal(q.ds, q_u.ds)


def _weight(qtype: str, n: int, k: int) -> Weight:
    raw = quant.quantize(torch.randn(n, k), GGMLQuantizationType[qtype]).to(DEVICE)
    return Weight(f"w_{qtype}", GGMLQuantizationType[qtype], (n, k), raw)


def test_each_consumer_finds_the_form_it_reads() -> None:
    """kernels/linear.py's reads_q8_1 decides both what the norm writes and what linear reads:
    all consumers int8 -> q8_1 only; some float -> both; none int8 (or a prompt) -> floats."""
    ops = get_ops("triton", {"norm_quant": True})
    gen = torch.Generator().manual_seed(2)
    w = _norm_weight(64, gen)
    x, r = torch.randn(2, 64, generator=gen).to(DEVICE), torch.randn(2, 64).to(DEVICE)
    q8, f16 = _weight("Q4_0", 16, 64), _weight("F16", 16, 64)
    _h, only_q8 = ops.add_rms_norm(x, r, w, 1e-6, consumers=(q8,))
    assert isinstance(only_q8, Activation) and only_q8.f32 is None
    _h, both = ops.add_rms_norm(x, r, w, 1e-6, consumers=(q8, f16))
    assert isinstance(both, Activation) and both.f32 is not None
    plain = ops.rms_norm(x, w, 1e-6, consumers=(f16,))
    assert isinstance(plain, torch.Tensor)
    prompt = ops.rms_norm(torch.randn(9, 64).to(DEVICE), w, 1e-6, consumers=(q8,))
    assert isinstance(prompt, torch.Tensor), "9 rows run the GEMM, which reads floats"
    for weight in (q8, f16):  # each reads its own form, and both agree with the floats
        y = ops.linear(both, weight)
        want = ops.linear(both.f32, weight)
        assert y.shape == want.shape and (y - want).abs().max() < 0.1 * want.abs().max()
    with pytest.raises(AssertionError, match="reads floats"):
        ops.linear(only_q8, f16)
    # float rows (the attention's output) of a decode batch are quantized where q8 reads them:
    # within q8_1's rounding of the float path; one row stays on floats (bitwise)
    rows = torch.randn(3, 64, generator=gen).to(DEVICE)
    plain = get_ops("triton", {"norm_quant": False})
    y, want = ops.linear(rows, q8), plain.linear(rows, q8)
    assert not torch.equal(y, want) and (y - want).abs().max() < 0.02 * want.abs().max()
    assert torch.equal(ops.linear(rows[:1], q8), plain.linear(rows[:1], q8))
    assert torch.equal(ops.linear(rows, f16), plain.linear(rows, f16))


def _micro(name: str):
    """A one-layer, 64-wide variant of a tiny preset (the interpreter is slow)."""
    if CUDA:
        return PRESETS[name]
    return dataclasses.replace(
        PRESETS[name], name=f"micro-{name}", n_layer=1, n_embd=64, n_head=2, n_head_kv=1,
        head_dim=32, n_ff=64, n_ff_expert=32,
    )  # fmt: skip


def _decode_logits(model) -> torch.Tensor:
    """The logits of the prompt's last token (chunks of 8 rows and 1: both decode-shaped) and
    of STEPS decoded tokens (fixed ids, the same for every path compared)."""
    engine = Engine(model, n_ctx=len(PROMPT) + STEPS + 1, ubatch=8)
    cache = engine.new_sequence()
    rows = [engine.prefill(PROMPT, cache)[-1].float().cpu()]
    for t in range(STEPS):
        rows.append(engine.decode((7 * t + 3) % 200, cache)[-1].float().cpu())
    return torch.stack(rows)


def _launched(monkeypatch) -> list[str]:
    from triton.runtime.jit import JITFunction

    from kiln.kernels.triton import matvec_q8

    cls = type(matvec_q8._matvec_q8_kernel)  # InterpretedFunction on the CPU
    run = cls.run
    names: list[str] = []

    def recording(self, *args, **kwargs):
        names.append(self.fn.__name__ + ("[experts]" if kwargs.get("EXPERTS") else ""))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", recording)
    assert cls is JITFunction or cls.__name__ == "InterpretedFunction"
    return names


@pytest.mark.parametrize(
    "name,qtype", [("tiny-qwen3", "q4_0"), ("tiny-llama", "q4_k_m"), ("tiny-qwen3moe", "q4_0")]
)
def test_decode_quality_and_the_toggle(name: str, qtype: str, monkeypatch) -> None:
    """norm_quant on: the fused norm and the int8 mat-vecs run, and the next-token
    distributions stay within the gate (mean KLD < 2e-3) of the float path; off: neither kernel
    runs (the toggle really turns it off)."""
    gguf = synthetic(_micro(name), qtype, device=DEVICE)
    launched = _launched(monkeypatch)
    # the prompt's 8-row chunks quantize the attention's output for attn_output (a launch of
    # its own); one-row steps do not
    kernels = {
        "_matvec_q8_kernel",
        "_rms_norm_quant_kernel",
        "_swiglu_quant_kernel",
        "_quantize_q8_1_kernel",
    }
    if name.endswith("moe"):  # the experts' gate/up and down read q8_1 (the expert variant)
        kernels.add("_matvec_q8_kernel[experts]")
    on = _decode_logits(build_model(gguf, DEVICE, backend="triton", fusions={"norm_quant": True}))
    assert kernels <= set(launched), sorted(set(launched))
    launched.clear()
    off = _decode_logits(build_model(gguf, DEVICE, backend="triton", fusions={"norm_quant": False}))
    assert not kernels & set(launched)
    log_p, log_q = torch.log_softmax(off.double(), -1), torch.log_softmax(on.double(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    same_top = (on.argmax(-1) == off.argmax(-1)).double().mean().item()
    print(f"{name} {qtype}: mean KLD {kl.mean().item():.2e}, max {kl.max().item():.2e}, top-1 "
          f"{same_top:.4f}")  # fmt: skip
    # Random weights give flat distributions with near-ties, where 8-bit activations may pick
    # the other token (on an H200: 0.954 and 0.985 of 65 rows at mean KLD 5.8e-5 and 1.4e-4);
    # the top-1 >= 99% gate is the demo model's (tests/test_cuda_decode.py). A MoE layer also
    # routes: random router logits have near-ties, and where the approximation flips one of the
    # top-k experts that row's distribution moves (on an H100, the full tiny-qwen3moe preset, 65
    # rows: most rows 1e-4 to 4e-4, a few 2.9e-3 to 9.0e-3, mean 2.8e-3). So for MoE the
    # gate is on the median row, which a wrong kernel moves as much as the mean.
    typical = kl.median() if name.endswith("moe") else kl.mean()
    assert typical.item() < 2e-3 and same_top >= 0.9


def test_output_norm_matches_the_rows_lm_head_reads() -> None:
    """A prompt chunk of 8 rows (decode-shaped) whose logits are read at its last row only: the
    output norm must not write q8_1 alone for a Q8_0 output projection, which reads floats at
    one row (found by `kiln ppl -ub 8 --fusion norm_quant=1` on the GPU, session 9). The logits
    of every row (logit_rows None) keep reading q8_1."""
    gguf = synthetic(_micro("tiny-qwen3"), "q8_0", device=DEVICE)
    model = build_model(gguf, DEVICE, backend="triton", fusions={"norm_quant": True})
    assert model.lm_head.qtype == GGMLQuantizationType.Q8_0
    engine = Engine(model, n_ctx=32, ubatch=8)
    last = engine.prefill(PROMPT[:8], engine.new_sequence())  # 8 rows, the last one's logits
    every = engine.prefill(PROMPT[:8], engine.new_sequence(), all_logits=True)
    assert last.shape[0] == 1 and every.shape[0] == 8
    assert torch.isfinite(last).all() and torch.isfinite(every).all()
    assert (last[0] - every[-1]).abs().max() < 0.05 * every[-1].abs().max()
