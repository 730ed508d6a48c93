"""kiln/kernels/formats.py, the one table of the kernels' formats: the ids match the @jit
helpers' constexprs (kernels/triton/dequant.py), every kernel's support set is formats with an
id, and the launchers and the triton op set decide by it."""

from __future__ import annotations

import pytest
import torch
import triton.language as tl
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from kiln.kernels import formats
from kiln.kernels.triton import dequant
from kiln.weight import Weight

_T = GGMLQuantizationType


def test_format_ids_are_the_dequant_constexprs() -> None:
    """FORMAT_IDS maps each GGML type onto dequant.py's constexpr of the same name, and those
    are all of dequant.py's ids, each once."""
    ids = {n: v.value for n, v in vars(dequant).items() if isinstance(v, tl.constexpr)}
    assert {q.name: i for q, i in formats.FORMAT_IDS.items()} == ids
    assert len(set(ids.values())) == len(ids)
    assert all(formats.format_id(q) == i for q, i in formats.FORMAT_IDS.items())
    assert set(formats.FLOAT_VIEW) == {_T.F32, _T.F16, _T.BF16}
    for q, dtype in formats.FLOAT_VIEW.items():
        assert GGML_QUANT_SIZES[q] == (1, dtype.itemsize), q.name


def test_support_table() -> None:
    """Each kernel reads formats that have an id; the lanes kernel's formats are exactly those
    kiln.kernels.matvec knows how to read with it (_WIDE); supports() answers from the table."""
    from kiln.kernels import matvec, matvec_q8

    assert set(formats.SUPPORT) == {
        "matvec", "matvec_lanes", "matvec_q8", "matmul_q8", "expert_linear", "matmul",
        "embedding",
    }  # fmt: skip
    for kernel, types in formats.SUPPORT.items():
        assert types <= set(formats.FORMAT_IDS), kernel
        assert all(formats.supports(kernel, q) for q in types)
        assert not formats.supports(kernel, _T.Q2_K), kernel
    assert formats.SUPPORT["matvec_lanes"] <= formats.SUPPORT["matvec"]
    assert set(matvec._WIDE) == formats.SUPPORT["matvec_lanes"]
    assert all(matvec._WIDE[q].fmt == formats.FORMAT_IDS[q] for q in matvec._WIDE)
    assert set(matvec_q8.VIEW) == set(matvec_q8.LANES) == formats.SUPPORT["matvec_q8"]
    # the int8 GEMM reads what the int8 mat-vec reads: a q8_1 batch never lacks a kernel
    assert formats.SUPPORT["matmul_q8"] == formats.SUPPORT["matvec_q8"]


def _weight(shape: tuple[int, ...], qtype=_T.Q8_0) -> Weight:
    bv, ts = GGML_QUANT_SIZES[qtype]
    raw = torch.zeros(*shape[:-1], shape[-1] // bv * ts, dtype=torch.uint8)
    return Weight("w", qtype, shape, raw)


@pytest.mark.parametrize("kernel", ("matvec", "expert_linear", "matmul", "embedding"))
def test_launchers_and_op_set_read_the_table(kernel: str, monkeypatch) -> None:
    """A format taken out of a kernel's entry is refused by its launcher, and the triton op set
    sends that weight to the reference instead (no launch)."""
    from kiln.kernels import embedding, matmul, matvec, moe
    from kiln.ops import triton_backend

    monkeypatch.setitem(formats.SUPPORT, kernel, formats.SUPPORT[kernel] - {_T.Q8_0})
    x = torch.zeros(1, 64)
    if kernel == "matvec":
        w = _weight((4, 64))
        with pytest.raises(AssertionError, match="matvec does not support Q8_0"):
            matvec.matvec(x, w)
        assert not triton_backend.kernel_reads("blk.0.attn_q.weight", _T.Q8_0)
        assert torch.equal(triton_backend.ops()["linear"](x, w), torch.zeros(1, 4))
    elif kernel == "matmul":  # the GEMM (M > 8) alone: the mat-vec still reads Q8_0
        w = _weight((4, 64))
        with pytest.raises(AssertionError, match="matmul does not support Q8_0"):
            matmul.matmul(torch.zeros(9, 64), w)
        out = triton_backend.ops()["linear"](torch.ones(9, 64), w)
        assert torch.equal(out, torch.zeros(9, 4))  # the reference of an all-zero weight
    elif kernel == "expert_linear":
        w = _weight((3, 4, 64))
        with pytest.raises(AssertionError, match="expert_linear does not support Q8_0"):
            moe.expert_linear(x, torch.zeros(1, 2, dtype=torch.long), w)
        assert not triton_backend.kernel_reads("blk.0.ffn_down_exps.weight", _T.Q8_0)
    else:
        w = _weight((5, 64))
        with pytest.raises(AssertionError, match="embedding does not support Q8_0"):
            embedding.embedding(w, torch.zeros(1, dtype=torch.long))
        assert not triton_backend.kernel_reads("token_embd.weight", _T.Q8_0)
        out = triton_backend.ops()["embedding"](w, torch.zeros(1, dtype=torch.long))
        assert torch.equal(out, torch.zeros(1, 64))
