"""Every way a GGUF file can be wrong ends in a KilnError whose message names the file and the
problem: structure (kiln.gguf.header / reader) and meaning (kiln.config)."""

from __future__ import annotations

import os
import signal
import struct
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import pytest
from gguf import GGUFReader

from kiln.errors import ConfigError, GGUFError, KilnError, UnsupportedError
from kiln.gguf import read_gguf
from kiln.gguf.header import MAX_ARRAY_DEPTH, MAX_ARRAY_LEN, check_header, parse_header
from tests.gguf.builders import (
    V,
    gstr,
    kv,
    kv_str,
    kv_u32,
    raw_gguf,
    tensor_info,
    write_tiny_llama,
)


@contextmanager
def time_limit(seconds: float):
    """Fail instead of hanging: gguf's own reader loops for ever on some of these files."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def expect(path: Path, exc: type[KilnError], *fragments: str, config: bool = False) -> str:
    """read_gguf(path) (and .config) raises exc; the message names the file and each fragment."""
    with time_limit(5), pytest.raises(exc) as info:
        model = read_gguf(path)
        if config:
            model.config  # noqa: B018
    msg = str(info.value)
    assert path.name in msg, msg
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    return msg


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_llama(tmp_path / "tiny.gguf", q8_tensor=True)


def write(tmp_path: Path, data: bytes, name: str = "bad.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


# -- the happy path ---------------------------------------------------------------------------


def test_tiny_llama_reads(tiny: Path):
    model = read_gguf(tiny)
    assert model.tensors["blk.0.attn_k.weight"].shape == (4, 8)
    assert model.tensors["extra.q8_0"].shape == (2, 64)
    assert model.metadata["tokenizer.ggml.tokens"][:3] == ["<unk>", "<s>", "</s>"]
    assert model.metadata["tokenizer.ggml.add_bos_token"] is True
    assert model.config.n_vocab == 16


@pytest.mark.parametrize("fixture", ["stories_model", "demo_model"])
def test_real_files(fixture: str, request: pytest.FixtureRequest):
    """The header walk is fast and agrees with what read_gguf builds (stories260K and the demo
    model, SmolLM2-135M-Instruct Q4_1, through the fixtures of tests/conftest.py)."""
    path = request.getfixturevalue(fixture)
    t0 = time.perf_counter()
    check_header(path)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"check_header took {elapsed:.2f} s"
    header = parse_header(path)
    model = read_gguf(path)
    assert header.metadata == model.metadata
    assert [t.name for t in header.tensors] == list(model.tensors)
    for info in header.tensors:
        raw = model.tensors[info.name]
        assert (raw.qtype, raw.shape, raw.nbytes) == (info.qtype, info.ne[::-1], info.nbytes)


def test_stories_header_matches_gguf_reader(stories_model: Path):
    """Against upstream gguf.GGUFReader (too slow to run on SmolLM2's vocab: ~4 s)."""
    header = parse_header(stories_model)
    reader = GGUFReader(stories_model)
    assert header.data_offset == reader.data_offset
    assert [t.name for t in header.tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(header.tensors, reader.tensors, strict=True):
        assert ours.qtype == theirs.tensor_type
        assert ours.ne == tuple(theirs.shape.tolist())
        assert (ours.offset, ours.nbytes) == (theirs.data_offset, theirs.n_bytes)
    for key, fld in reader.fields.items():
        if not key.startswith("GGUF."):
            assert header.metadata[key] == fld.contents(), key


def test_tiny_header_matches_gguf_reader(tiny: Path):
    header = parse_header(tiny)
    reader = GGUFReader(tiny)
    assert header.data_offset == reader.data_offset
    assert (
        header.metadata["tokenizer.ggml.scores"]
        == reader.fields["tokenizer.ggml.scores"].contents()
    )
    assert [(t.offset, t.nbytes) for t in header.tensors] == [
        (t.data_offset, t.n_bytes) for t in reader.tensors
    ]


# -- not a GGUF file at all --------------------------------------------------------------------


def test_missing_path(tmp_path: Path):
    expect(tmp_path / "nope.gguf", GGUFError, "no such file")


def test_directory(tmp_path: Path):
    d = tmp_path / "model.gguf"
    d.mkdir()
    expect(d, GGUFError, "directory")


def test_empty_file(tmp_path: Path):
    expect(write(tmp_path, b""), GGUFError, "empty")


@pytest.mark.parametrize(
    "data, fragments",
    [
        (b"PK\x03\x04" + b"\0" * 60, ["not a GGUF file", "b'PK\\x03\\x04'", "zip"]),
        (b"tjgg" + b"\0" * 60, ["not a GGUF file", "GGJT"]),
        (b"version https://git-lfs.github.com/spec/v1\n", ["Git LFS", "git lfs pull"]),
        (b"<!DOCTYPE html><html></html>", ["HTML"]),
        (struct.pack("<Q", 20) + b'{"a": {"dtype": "F32"}}', ["safetensors"]),
        (b"gguf" + b"\0" * 60, ["not a GGUF file", "b'gguf'"]),
        (b"X", ["not a GGUF file"]),
    ],
    ids=["zip", "ggjt", "lfs", "html", "safetensors", "lowercase", "one-byte"],
)
def test_wrong_magic(tmp_path: Path, data: bytes, fragments: list[str]):
    expect(write(tmp_path, data), GGUFError, *fragments)


@pytest.mark.parametrize("version", [1, 4])
def test_unsupported_version(tiny: Path, version: int):
    data = bytearray(tiny.read_bytes())
    data[4:8] = struct.pack("<I", version)
    expect(
        write(tiny.parent, bytes(data)), UnsupportedError, f"version {version}", "versions 2 and 3"
    )


@pytest.mark.parametrize("version", [0, 0xDEADBEEF])
def test_garbage_version(tiny: Path, version: int):
    data = bytearray(tiny.read_bytes())
    data[4:8] = struct.pack("<I", version)
    expect(write(tiny.parent, bytes(data)), GGUFError, f"version {version}")


def test_big_endian(tiny: Path):
    data = bytearray(tiny.read_bytes())
    data[4:8] = struct.pack(">I", 3)
    expect(write(tiny.parent, bytes(data)), UnsupportedError, "big-endian")


# -- truncation -------------------------------------------------------------------------------


def _cut_points(path: Path) -> dict[str, int]:
    """Named offsets inside each part of a valid file (from gguf's reader, trusted here)."""
    r = GGUFReader(path)
    tokens = r.fields["tokenizer.ggml.tokens"]
    name = r.fields["general.name"]
    info = r.tensors[3].field
    return {
        "magic": 2,
        "version": 6,
        "tensor count": 12,
        "kv count": 20,
        "key length": r.fields["general.architecture"].offset + 3,
        "key name": r.fields["general.name"].offset + 10,
        "value type": name.offset + 8 + len("general.name") + 2,
        "string value": name.offset + 8 + len("general.name") + 4 + 8 + 3,
        "array count": tokens.offset + 8 + len("tokenizer.ggml.tokens") + 4 + 4 + 2,
        "array string": tokens.offset + 8 + len("tokenizer.ggml.tokens") + 4 + 12 + 20,
        "tensor name": info.offset + 10,
        "tensor dims": info.offset + 8 + len(r.tensors[3].name) + 4 + 3,
        "tensor offset": info.offset + sum(int(p.nbytes) for p in info.parts) - 1,
        "padding": r.data_offset - 1,
        "tensor data": r.data_offset + 100,
        "last tensor": r.tensors[-1].data_offset + r.tensors[-1].n_bytes - 1,
    }


CUT_POINTS = [
    "magic",
    "version",
    "tensor count",
    "kv count",
    "key length",
    "key name",
    "value type",
    "string value",
    "array count",
    "array string",
    "tensor name",
    "tensor dims",
    "tensor offset",
    "padding",
    "tensor data",
    "last tensor",
]


@pytest.mark.parametrize("where", CUT_POINTS)
def test_truncated(tiny: Path, where: str):
    cut = _cut_points(tiny)[where]
    p = write(tiny.parent, tiny.read_bytes()[:cut], "cut.gguf")
    expect(p, GGUFError, "truncated")


def test_truncated_everywhere(tiny: Path):
    """Every cut inside the header and many inside the data: a GGUFError saying 'truncated'."""
    data = tiny.read_bytes()
    reader = GGUFReader(tiny)
    data_end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    cuts = list(range(1, reader.data_offset + 1)) + list(range(reader.data_offset, data_end, 13))
    p = tiny.parent / "cut.gguf"
    for cut in cuts:
        p.write_bytes(data[:cut])
        with time_limit(5), pytest.raises(GGUFError) as info:
            check_header(p)
        assert "truncated" in str(info.value) and "cut.gguf" in str(info.value), (cut, info.value)
    for cut in cuts[::17]:  # the full reader too, on a sample (it is slower)
        p.write_bytes(data[:cut])
        expect(p, GGUFError, "truncated")
    # A cut after the last tensor only loses padding: the file is still complete.
    p.write_bytes(data[:data_end])
    read_gguf(p)


# -- counts and lengths -----------------------------------------------------------------------

ARCH = kv_str("general.architecture", "llama")


@pytest.mark.parametrize(
    "data, fragments",
    [
        (raw_gguf([ARCH], n_kv=2**60), ["metadata key count", str(2**60)]),
        (raw_gguf([ARCH], n_kv=2**64 - 1), ["metadata key count"]),
        (raw_gguf([ARCH], n_tensors=2**60), ["tensor count", str(2**60)]),
        (
            raw_gguf([ARCH, kv("big", V.ARRAY, struct.pack("<IQ", V.UINT8, 2**20))]),
            ["'big'", str(2**20)],
        ),
        # gguf's reader loops ~forever here: every element read past the end is empty.
        (
            raw_gguf([ARCH, kv("tokens", V.ARRAY, struct.pack("<IQ", V.STRING, 2**24))]),
            ["'tokens'", str(2**24)],
        ),
        (
            raw_gguf([ARCH, kv("s", V.STRING, struct.pack("<Q", 2**63))]),
            ["truncated", "string value of metadata key 's'"],
        ),
        (raw_gguf([gstr("k" * 10) + b"\0"], pad=False), ["truncated", "'kkkkkkkkkk'"]),
        (
            raw_gguf([struct.pack("<Q", 2**64 - 1) + b"abc" * 8], pad=False),
            ["truncated", "metadata key #0"],
        ),
        (
            raw_gguf(
                [
                    ARCH,
                    kv(
                        "a",
                        V.ARRAY,
                        struct.pack("<IQ", V.STRING, 2) + gstr("x") + struct.pack("<Q", 2**40),
                    ),
                ]
            ),
            ["truncated", "string #1", "'a'"],
        ),
    ],
    ids=[
        "n_kv",
        "n_kv_max",
        "n_tensors",
        "u8_array",
        "string_array",
        "string_len",
        "cut_key",
        "key_len",
        "array_item_len",
    ],
)
def test_huge_counts(tmp_path: Path, data: bytes, fragments: list[str]):
    expect(write(tmp_path, data), GGUFError, *fragments)


def test_array_longer_than_kiln_reads(tmp_path: Path):
    n = MAX_ARRAY_LEN + 1
    data = raw_gguf([ARCH, kv("huge", V.ARRAY, struct.pack("<IQ", V.UINT8, n))])
    expect(write(tmp_path, data), GGUFError, "'huge'", str(n), "at most")


# -- metadata ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kvs, fragments",
    [
        ([ARCH, ARCH], ["'general.architecture'", "appears twice"]),
        ([ARCH, kv_u32("GGUF.version", 3)], ["'GGUF.version'", "reserved"]),
        ([ARCH, kv(b"bad\xff\xfekey", V.UINT8, b"\1")], ["metadata key #1", "UTF-8"]),
        ([ARCH, kv_str("s", b"caf\xe9")], ["'s'", "UTF-8"]),
        (
            [
                ARCH,
                kv("toks", V.ARRAY, struct.pack("<IQ", V.STRING, 2) + gstr("ok") + gstr(b"\xc3")),
            ],
            ["'toks'", "UTF-8"],
        ),
        ([ARCH, kv("x", 13, b"\0" * 8)], ["'x'", "unknown value type id 13"]),
        ([ARCH, kv("x", 2**32 - 1, b"\0" * 8)], ["'x'", f"unknown value type id {2**32 - 1}"]),
        ([ARCH, kv("x", V.ARRAY, struct.pack("<IQ", 77, 0))], ["'x'", "unknown value type id 77"]),
        (
            [
                ARCH,
                kv(
                    "nest",
                    V.ARRAY,
                    struct.pack("<IQ", V.ARRAY, 1) * (MAX_ARRAY_DEPTH + 1)
                    + struct.pack("<IQ", V.UINT8, 0),
                ),
            ],
            ["'nest'", "nested more than"],
        ),
        ([ARCH, kv_u32("general.alignment", 0)], ["general.alignment", "power of two"]),
        ([ARCH, kv_u32("general.alignment", 48)], ["general.alignment", "power of two"]),
        (
            [ARCH, kv("general.alignment", V.UINT64, struct.pack("<Q", 32))],
            ["general.alignment", "UINT32"],
        ),
    ],
    ids=[
        "dup_key",
        "reserved_key",
        "key_utf8",
        "value_utf8",
        "array_utf8",
        "type_13",
        "type_max",
        "array_type",
        "nesting",
        "align_0",
        "align_48",
        "align_type",
    ],
)
def test_bad_metadata(tmp_path: Path, kvs: list[bytes], fragments: list[str]):
    expect(write(tmp_path, raw_gguf(kvs)), GGUFError, *fragments)


def test_nested_arrays_within_limit_read(tmp_path: Path):
    inner = struct.pack("<IQ", V.UINT16, 2) + struct.pack("<2H", 7, 8)
    data = raw_gguf([ARCH, kv("nest", V.ARRAY, struct.pack("<IQ", V.ARRAY, 2) + inner * 2)])
    assert parse_header(write(tmp_path, data)).metadata["nest"] == [[7, 8], [7, 8]]


# -- tensor infos -----------------------------------------------------------------------------


def one_tensor(
    ne: list[int],
    type_id: int = 0,
    offset: int = 0,
    name: str | bytes = "w",
    data: bytes = b"\0" * 64,
) -> bytes:
    return raw_gguf([ARCH], [tensor_info(name, ne, type_id, offset)], data)


@pytest.mark.parametrize(
    "data, exc, fragments",
    [
        (one_tensor([16], type_id=99), GGUFError, ["unknown tensor type id 99", "'w'"]),
        (one_tensor([16], type_id=4), GGUFError, ["unknown tensor type id 4", "'w'"]),  # Q4_2
        (one_tensor([16], type_id=2**32 - 1), GGUFError, ["unknown tensor type id"]),
        (one_tensor([17]), GGUFError, ["'w'", "runs past the end", "68 bytes"]),
        (one_tensor([16], offset=2**40), GGUFError, ["'w'", "runs past the end"]),
        (one_tensor([16], offset=2**64 - 32), GGUFError, ["'w'", "runs past the end"]),
        (one_tensor([16], offset=4), GGUFError, ["'w'", "not a multiple of the alignment"]),
        (one_tensor([1, 1, 1, 1, 1]), GGUFError, ["'w'", "5 dimensions"]),
        (one_tensor([]), UnsupportedError, ["'w'", "no dimensions"]),
        (one_tensor([16, 0]), GGUFError, ["'w'", "invalid dimension"]),
        (one_tensor([2**63]), GGUFError, ["'w'", "invalid dimension"]),
        (one_tensor([2**32, 2**32]), GGUFError, ["'w'", "overflows"]),
        (one_tensor([2**31, 2**31, 2**31]), GGUFError, ["'w'", "overflows"]),
        (one_tensor([2**20, 2**20]), GGUFError, ["'w'", "runs past the end"]),
        (one_tensor([16], type_id=8), GGUFError, ["'w'", "Q8_0", "multiple of the block size 32"]),
        (one_tensor([16], name=b"w\xff"), GGUFError, ["tensor #0", "UTF-8"]),
        (
            raw_gguf([ARCH], [tensor_info("w", [4], 0, 0)] * 2, b"\0" * 64),
            GGUFError,
            ["'w'", "appears twice"],
        ),
        (
            raw_gguf(
                [ARCH], [tensor_info("a", [16], 0, 0), tensor_info("b", [8], 0, 32)], b"\0" * 64
            ),
            GGUFError,
            ["'a'", "'b'", "overlap"],
        ),
    ],
    ids=[
        "type_99",
        "type_removed",
        "type_max",
        "past_end",
        "offset_far",
        "offset_wraps",
        "misaligned",
        "n_dims_5",
        "n_dims_0",
        "zero_dim",
        "dim_2_63",
        "overflow_2",
        "overflow_3",
        "huge_shape",
        "partial_block",
        "name_utf8",
        "dup_name",
        "overlap",
    ],
)
def test_bad_tensor_info(tmp_path: Path, data: bytes, exc: type[KilnError], fragments: list[str]):
    expect(write(tmp_path, data), exc, *fragments)


def test_unknown_tensor_type_in_real_layout(tiny: Path):
    r = GGUFReader(tiny)
    t = r.tensors[4]
    type_at = t.field.offset + sum(int(p.nbytes) for p in t.field.parts[:4])
    data = bytearray(tiny.read_bytes())
    data[type_at : type_at + 4] = struct.pack("<I", 99)
    expect(write(tiny.parent, bytes(data)), GGUFError, "unknown tensor type id 99", repr(t.name))


def test_tensor_past_end_of_real_file(tiny: Path):
    data = tiny.read_bytes()
    r = GGUFReader(tiny)
    last = r.tensors[-1]
    cut = last.data_offset + 10
    p = write(tiny.parent, data[:cut])
    expect(p, GGUFError, repr(last.name), "runs past the end", f"file ({cut} bytes)")


def test_alignment_respected(tmp_path: Path):
    data = raw_gguf(
        [ARCH, kv_u32("general.alignment", 64)],
        [tensor_info("a", [8], 0, 0), tensor_info("b", [4, 2], 0, 64)],
        b"\0" * 128,
        alignment=64,
    )
    header = parse_header(write(tmp_path, data))
    assert header.alignment == 64 and header.data_offset % 64 == 0
    assert [t.offset - header.data_offset for t in header.tensors] == [0, 64]
    model = read_gguf(tmp_path / "bad.gguf")
    assert model.tensors["b"].shape == (2, 4)


# -- meaning: kiln.config -----------------------------------------------------------------------


def config_case(tmp_path: Path, **kw) -> Path:
    return write_tiny_llama(tmp_path / "model.gguf", **kw)


def test_config_reads(tmp_path: Path):
    cfg = read_gguf(config_case(tmp_path)).config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.n_vocab) == (1, 8, 2, 1, 16)


@pytest.mark.parametrize(
    "key",
    [
        "llama.embedding_length",
        "llama.attention.head_count",
        "llama.block_count",
        "llama.context_length",
        "llama.attention.layer_norm_rms_epsilon",
    ],
)
def test_config_missing_key(tmp_path: Path, key: str):
    expect(config_case(tmp_path, meta={key: None}), ConfigError, key, config=True)


def test_config_missing_architecture(tmp_path: Path):
    p = config_case(tmp_path)
    data = p.read_bytes()
    assert data.count(b"general.architecture") == 1
    p.write_bytes(data.replace(b"general.architecture", b"general.architectur_"))
    expect(p, ConfigError, "general.architecture", config=True)


def test_config_unsupported_architecture(tmp_path: Path):
    p = config_case(tmp_path, arch="mamba")
    expect(p, UnsupportedError, "'mamba'", config=True)


@pytest.mark.parametrize(
    "tensors, fragments",
    [
        ({"blk.0.attn_k.weight": (8, 8)}, ["'blk.0.attn_k.weight'", "[8, 8]", "[4, 8]"]),
        ({"token_embd.weight": (20, 8)}, ["'token_embd.weight'", "[20, 8]"]),
        ({"blk.0.ffn_down.weight": (16, 8)}, ["'blk.0.ffn_down.weight'"]),
        ({"blk.0.ffn_down.weight": None}, ["missing", "blk.0.ffn_down.weight"]),
        ({"output_norm.weight": None}, ["missing", "output_norm.weight"]),
    ],
    ids=["attn_k", "vocab", "ffn_down", "missing_ffn_down", "missing_output_norm"],
)
def test_config_tensor_contradicts_metadata(tmp_path: Path, tensors, fragments):
    expect(config_case(tmp_path, tensors=tensors), ConfigError, *fragments, config=True)


@pytest.mark.parametrize(
    "meta, fragments",
    [
        ({"llama.attention.head_count_kv": (3, V.UINT32)}, ["head_count_kv"]),
        ({"llama.block_count": ("one", V.STRING)}, ["'llama.block_count'"]),
        ({"llama.block_count": (0, V.UINT32)}, ["'llama.block_count'"]),
        (
            {"llama.attention.layer_norm_rms_epsilon": ("x", V.STRING)},
            ["'llama.attention.layer_norm_rms_epsilon'"],
        ),
        ({"llama.embedding_length": (7, V.UINT32)}, ["embedding_length"]),
        # block_count 2**31: must fail fast on the missing layers, not build 2**31 layers' names.
        ({"llama.block_count": (2**31, V.UINT32)}, []),
        ({"llama.block_count": (float("nan"), V.FLOAT32)}, ["'llama.block_count'"]),
        ({"llama.block_count": (float("inf"), V.FLOAT32)}, ["'llama.block_count'"]),
        ({"tokenizer.ggml.tokens": (7, V.UINT32)}, ["tokenizer.ggml.tokens"]),
    ],
    ids=[
        "head_kv",
        "str_block_count",
        "zero_block_count",
        "str_eps",
        "embd_not_div",
        "huge_block_count",
        "nan_block_count",
        "inf_block_count",
        "tokens_not_array",
    ],
)
def test_config_bad_values(tmp_path: Path, meta, fragments):
    expect(config_case(tmp_path, meta=meta), ConfigError, *fragments, config=True)


# -- files that are not what they seem ------------------------------------------------------


def test_fifo_is_not_opened(tmp_path: Path):
    """A named pipe would block a reader for ever; it is rejected before it is opened."""
    p = tmp_path / "pipe.gguf"
    os.mkfifo(p)
    expect(p, GGUFError, "not a regular file")


def test_large_sparse_file_reads_without_touching_data(tmp_path: Path):
    """A 16 GiB tensor in a sparse file: the header walk and read_gguf stay fast and small."""
    n = 1 << 32  # F32 values: 16 GiB
    p = tmp_path / "big.gguf"
    p.write_bytes(raw_gguf([ARCH], [tensor_info("big", [n], 0, 0)]))
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size + 4 * n)
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        check_header(p)
        model = read_gguf(p)
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert model.tensors["big"].shape == (n,)
    assert elapsed < 2.0 and peak < 16 << 20, (elapsed, peak)
