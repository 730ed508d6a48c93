"""`kiln info` on the real models, and its errors."""

from __future__ import annotations

import pytest

from kiln.cli import main


def test_info_stories(stories_model, capsys):
    assert main(["info", str(stories_model)]) == 0
    out = capsys.readouterr().out
    assert "architecture   llama" in out
    assert "292.80 K" in out
    assert "SentencePiece (llama), vocab 512" in out
    assert "context        2048" in out
    assert "F32        48 tensors" in out


def test_info_demo_by_name(demo_model, capsys):
    assert main(["info", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    assert "Smollm2 135M" in out
    assert "134.52 M" in out
    assert "BPE (gpt2), pre-tokenizer smollm, vocab 49152" in out
    assert "bits/weight    5.74" in out
    for line in ("Q4_1      210 tensors", "Q8_0        1 tensors", "F32        61 tensors"):
        assert line in out
    assert "tied to token_embd" in out


@pytest.mark.parametrize(
    ("arg", "words"),
    [
        ("no-such-model", "neither a GGUF file nor a known model name"),
        ("missing.gguf", "missing.gguf: no such file"),
    ],
)
def test_info_errors(arg, words, capsys):
    assert main(["info", arg]) == 1
    err = capsys.readouterr().err
    assert words in err
    assert "Traceback" not in err


def test_info_not_gguf(tmp_path, capsys):
    bad = tmp_path / "notes.gguf"
    bad.write_bytes(b"hello, this is not a model" * 10)
    assert main(["info", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "notes.gguf" in err and "Traceback" not in err


def test_info_says_what_runs_each_op_and_which_weights_no_kernel_reads(tmp_path, capsys):
    """On the triton backend (built in Triton's interpreter here) a format without a kernel
    (MXFP4) is named: its weights run the reference."""
    from kiln.gguf.synthetic import build_model as synthetic
    from kiln.gguf.writer import write_gguf

    path = tmp_path / "m.gguf"
    write_gguf(synthetic("tiny-llama", "mxfp4", layers=1), path)
    assert main(["info", str(path), "--device", "cpu", "--backend", "triton"]) == 0
    out = capsys.readouterr().out
    assert "ops (triton backend):" in out and "mat-vec at 1 row;" in out
    assert "quantized GEMM above" in out
    slow = out.split("no kernel reads")[1]
    assert "blk.0.ffn_down.weight (MXFP4)" in slow and "output_norm" not in slow
    assert main(["info", str(path), "--device", "cpu", "--backend", "torch"]) == 0
    assert "no kernel reads" not in capsys.readouterr().out
