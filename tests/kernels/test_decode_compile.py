"""Every kernel of the GPU decode step, as the model launches it at the real shapes of each
benchmark preset, compiles for an H100 (sm_90) — checked on the CPU (tests/kernels/sm90.py), one
layer per model, with and without the fusions (norm_quant's int8 mat-vecs among them), for a
decode batch of 2 and of 1. With the `pdl`
fusion every kernel is launched with programmatic dependent launch and waits
(griddepcontrol.wait) for its inputs; without it none does."""

from __future__ import annotations

import json

import pytest

from tests.kernels.sm90 import run_compile_check

CODE = """
import json, torch
import kiln.gguf.synthetic
import kiln.ops
from kiln.fusion import FUSIONS
from kiln.gguf.synthetic import build_model as synthetic
from kiln.models import build_model
from kiln.ops import get_ops
from kiln.runtime.engine import Engine
from tests.kernels.sm90 import compile_only

kiln.ops.interpreting = lambda: True  # lets the triton backend be built on the CPU: compile_only
# The compiler sees shapes and dtypes only: 64 distinct quantized chunks per pool instead of
# 16384 (whose K-quant search took 22 of the 30B's 75 s on 2 loaded cores).
kiln.gguf.synthetic.POOL_CHUNKS = 64
gguf = synthetic({preset!r}, {qtype!r}, layers=1)
names = set()
for fused in (True, False):
    fusions = {{n: fused for n in FUSIONS if n != "cuda_graphs"}}
    with compile_only() as done:
        model = build_model(gguf, "cpu", backend="triton", keep_dense=False, fusions=fusions)
        model.ops = get_ops("triton", fusions)  # pdl as on an H100 (a CPU's policy turns it off)
        engine = Engine(model, n_ctx=64, n_seq=2)
        seqs = [engine.new_sequence() for _ in range(2)]
        for seq in seqs:  # positions 0..4 written by the reference path (a prompt), no kernel
            engine.pool.reserve(seq, 5)
            seq.length = 5
        engine.decode_batch([3, 4], seqs)  # a decode batch of 2: the batched mat-muls
        engine.decode(5, seqs[0])  # one sequence: the M = 1 mat-vecs
    names |= {{c.kernel for c in done}}
    wrong = [c.kernel for c in done if (c.launch_pdl, c.waits) != (fused, fused)]
    assert not wrong, f"pdl={{fused}}: launch_pdl or the wait differ in {{wrong}}"
print(json.dumps(sorted(names)))
"""


@pytest.mark.parametrize(
    ("preset", "qtype"),
    [("qwen3-0.6b", "q8_0"), ("qwen3-8b", "q4_k_m"), ("llama3-8b", "q4_0"),
     ("qwen3-30b-a3b", "q4_k_m")],
)  # fmt: skip
def test_decode_step_compiles_for_sm90(preset, qtype):
    names = json.loads(run_compile_check(CODE.format(preset=preset, qtype=qtype)).splitlines()[-1])
    assert any("matvec" in n for n in names), names  # M = 1 (and the MoE experts)
    # M = 2: linear.batch_method's byte mat-vec; Q4_K and Q6_K run the one-row kernel per row
    assert "_matvec_kernel" in names or qtype == "q4_k_m", names
    # norm_quant (fused on): the int8 mat-vec (Q8_0 from 2 rows: the decode batch of 2)
    assert {"_matvec_q8_kernel", "_rms_norm_quant_kernel"} <= set(names), names
    if "a3b" not in preset:  # a dense FFN: its down mat-vec reads the SwiGLU result in q8_1
        assert "_swiglu_quant_kernel" in names, names
    assert any("attention" in n for n in names), names
    assert any("norm" in n for n in names), names
