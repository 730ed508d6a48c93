"""The reader's layout rule (kiln.gguf.header: check_layout), llama.cpp's: tensor data one after
another in header order, each padded to general.alignment; after the last tensor nothing but its
padding. Real files (written by llama.cpp's converter and gguf-py) keep loading; a spliced file
(two writes of one path), extra bytes, gaps, overlaps and data laid out for another alignment
are GGUFErrors that say so."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from gguf import GGUFWriter

from kiln.cli import main
from kiln.errors import GGUFError
from kiln.gguf.header import parse_header
from kiln.gguf.reader import read_gguf
from kiln.gguf.synthetic import build_model
from kiln.gguf.writer import write_gguf
from tests.conftest import shared_path
from tests.gguf.builders import kv_str, kv_u32, raw_gguf, tensor_info

F32 = 0


def _odd_tensors_file(path: Path) -> tuple[Path, int]:
    """Two F32 tensors of 5 and 3 values (20 and 12 bytes: neither a multiple of the alignment),
    written by gguf-py -> (path, the end of the last tensor's data)."""
    import numpy as np

    w = GGUFWriter(path, "llama")
    w.add_tensor("a", np.arange(5, dtype=np.float32))
    w.add_tensor("b", np.arange(3, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    h = parse_header(path, decode=False)
    last = h.tensors[-1]
    return path, last.offset + last.nbytes


# -- what must keep loading -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "parts",
    [
        ("models", "stories260K.gguf"),
        ("vocab", "ggml-vocab-llama-spm.gguf"),
        ("vocab", "ggml-vocab-llama-bpe.gguf"),
        ("vocab", "ggml-vocab-gpt-2.gguf"),
        ("vocab", "ggml-vocab-qwen2.gguf"),
    ],
)
def test_real_files_keep_loading(parts):
    path = shared_path(*parts)
    h = parse_header(path, decode=False)
    if h.tensors:
        read_gguf(path)


def test_the_padding_of_the_last_tensor_may_be_there_or_not(tmp_path):
    path, end = _odd_tensors_file(tmp_path / "odd.gguf")
    data = path.read_bytes()
    assert len(data) == end + 20  # gguf-py pads the last tensor to 32 bytes
    read_gguf(path)
    path.write_bytes(data[:end])  # no padding at all: accepted as llama.cpp does
    read_gguf(path)


def test_a_vocabulary_file_may_end_at_its_header_or_its_padding(tmp_path):
    body = raw_gguf([kv_str("general.architecture", "llama")], pad=False)
    path = tmp_path / "vocab.gguf"
    path.write_bytes(body)  # gguf-py: no padding after the header of a file without tensors
    parse_header(path)
    padded = body + b"\0" * (-len(body) % 32)  # llama.cpp's writer: padded
    path.write_bytes(padded)
    parse_header(path)
    path.write_bytes(padded + b"\0" * 32)
    with pytest.raises(GGUFError, match="follow the end of the header"):
        parse_header(path)


# -- what must be refused -------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [1, 31, 32, 4096])
def test_bytes_after_the_last_tensors_padding_are_refused(tmp_path, extra):
    path, end = _odd_tensors_file(tmp_path / "odd.gguf")
    data = path.read_bytes()
    path.write_bytes(data + b"\0" * extra)
    with pytest.raises(GGUFError, match=r"bytes follow the end of the last tensor 'b'"):
        read_gguf(path)
    # the padding itself may hold no more than the alignment: one byte past it is refused too
    path.write_bytes(data[:end] + b"\0" * 33)
    with pytest.raises(GGUFError, match="more than the padding to the alignment of 32"):
        read_gguf(path)


def test_a_spliced_model_is_refused_by_the_reader_and_by_kiln_info(tmp_path, capsys):
    """The case of the issue (a q4_0 model written over a q8_0 one by a second run, leaving the
    q8_0 file's tail after the q4_0 data), with F16 over F32."""
    small, big = tmp_path / "f16.gguf", tmp_path / "f32.gguf"
    write_gguf(build_model("tiny-llama", "f16"), small, progress=False)
    write_gguf(build_model("tiny-llama", "f32"), big, progress=False)
    a, b = small.read_bytes(), big.read_bytes()
    assert len(b) > len(a)
    spliced = tmp_path / "spliced.gguf"
    spliced.write_bytes(a + b[len(a) :])
    with pytest.raises(GGUFError, match="spliced"):
        read_gguf(spliced)
    assert main(["info", str(spliced)]) == 1
    err = capsys.readouterr().err
    assert "bytes follow the end of the last tensor" in err and "Traceback" not in err


def _two_tensor_file(offsets: tuple[int, int], alignment: int = 32, declare: bool = False):
    """Raw file: tensors x (8 F32 = 32 bytes) and y (8 F32) at the given relative offsets, the
    data section long enough for both."""
    kvs = [kv_str("general.architecture", "llama")]
    if declare:
        kvs.append(kv_u32("general.alignment", alignment))
    infos = [tensor_info("x", [8], F32, offsets[0]), tensor_info("y", [8], F32, offsets[1])]
    end = max(offsets) + 32
    data = struct.pack("<8f", *range(8)) * (end // 32)
    return raw_gguf(kvs, infos, data[:end], alignment=alignment)


@pytest.mark.parametrize(
    ("offsets", "words"),
    [
        ((0, 64), "leaves a gap"),  # a hole of 32 bytes between x and y
        ((0, 0), "overlap"),  # both tensors on the same bytes
        ((32, 0), "has data offset 32, expected 0"),  # header order differs from the data's
    ],
)
def test_gaps_overlaps_and_out_of_order_data_are_refused(tmp_path, offsets, words):
    path = tmp_path / "bad.gguf"
    path.write_bytes(_two_tensor_file(offsets))
    with pytest.raises(GGUFError, match=words):
        parse_header(path)
    path.write_bytes(_two_tensor_file((0, 32)))  # the same tensors, laid out right
    parse_header(path)


def test_data_laid_out_for_another_alignment_is_refused(tmp_path):
    """general.alignment says 64, but the data was laid out for 32: the second tensor starts at
    32, which is not where a 64-aligned writer puts it."""
    path = tmp_path / "align.gguf"
    path.write_bytes(_two_tensor_file((0, 32), alignment=64, declare=True))
    with pytest.raises(GGUFError, match="not a multiple of the alignment 64"):
        parse_header(path)
    # laid out for 128 while declaring 64: every offset is a multiple of 64, but the second
    # tensor is not where a 64-aligned writer puts it
    path.write_bytes(_two_tensor_file((0, 128), alignment=64, declare=True))
    with pytest.raises(GGUFError, match="has data offset 128, expected 64"):
        parse_header(path)
    # the same tensors laid out for the alignment of 64 they declare are read
    path.write_bytes(_two_tensor_file((0, 64), alignment=64, declare=True))
    assert parse_header(path).alignment == 64
    # and a model written by Kiln with a declared alignment of 64 too
    model = build_model("tiny-llama", "f16")
    model.metadata["general.alignment"] = 64
    write_gguf(model, tmp_path / "a64.gguf", progress=False)
    assert parse_header(tmp_path / "a64.gguf").alignment == 64
    read_gguf(tmp_path / "a64.gguf")
