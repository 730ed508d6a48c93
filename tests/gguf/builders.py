"""Small GGUF files for the reader tests: a tiny llama written with gguf.GGUFWriter, and a raw
byte-level writer for structures GGUFWriter refuses to write (duplicate keys, bad types, ...)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGMLQuantizationType, GGUFValueType

V = GGUFValueType
N_VOCAB = 16

# key -> (value, type); general.architecture is added by GGUFWriter from `arch`.
TINY_LLAMA_META: dict[str, tuple[Any, GGUFValueType]] = {
    "general.name": ("tiny llama", V.STRING),
    "llama.block_count": (1, V.UINT32),
    "llama.context_length": (32, V.UINT32),
    "llama.embedding_length": (8, V.UINT32),
    "llama.feed_forward_length": (16, V.UINT32),
    "llama.attention.head_count": (2, V.UINT32),
    "llama.attention.head_count_kv": (1, V.UINT32),
    "llama.attention.layer_norm_rms_epsilon": (1e-5, V.FLOAT32),
    "llama.rope.freq_base": (10000.0, V.FLOAT32),
    "tokenizer.ggml.model": ("llama", V.STRING),
    "tokenizer.ggml.tokens": (
        ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, N_VOCAB)],
        V.ARRAY,
    ),
    "tokenizer.ggml.scores": ([float(-i) for i in range(N_VOCAB)], V.ARRAY),
    "tokenizer.ggml.token_type": ([2, 3, 3] + [1] * (N_VOCAB - 3), V.ARRAY),
    "tokenizer.ggml.bos_token_id": (1, V.UINT32),
    "tokenizer.ggml.add_bos_token": (True, V.BOOL),
}

# name -> torch-order shape (numpy shape; ggml's ne is the reverse)
TINY_LLAMA_TENSORS: dict[str, tuple[int, ...]] = {
    "token_embd.weight": (N_VOCAB, 8),
    "output_norm.weight": (8,),
    "blk.0.attn_norm.weight": (8,),
    "blk.0.attn_q.weight": (8, 8),
    "blk.0.attn_k.weight": (4, 8),
    "blk.0.attn_v.weight": (4, 8),
    "blk.0.attn_output.weight": (8, 8),
    "blk.0.ffn_norm.weight": (8,),
    "blk.0.ffn_gate.weight": (16, 8),
    "blk.0.ffn_up.weight": (16, 8),
    "blk.0.ffn_down.weight": (8, 16),
}


def write_tiny_llama(
    path: Path,
    *,
    arch: str = "llama",
    meta: dict[str, tuple[Any, GGUFValueType] | None] | None = None,
    tensors: dict[str, tuple[int, ...] | None] | None = None,
    q8_tensor: bool = False,
) -> Path:
    """Write the tiny llama; `meta`/`tensors` override entries (None drops one).

    q8_tensor adds an extra Q8_0 tensor (ignored by the config) so that a file has a quantized
    tensor too.
    """
    md = {**TINY_LLAMA_META, **(meta or {})}
    ts = {**TINY_LLAMA_TENSORS, **(tensors or {})}
    w = GGUFWriter(path, arch)
    for key, kv in md.items():
        if kv is not None:
            w.add_key_value(key, kv[0], kv[1])
    rng = np.random.default_rng(0)
    for name, shape in ts.items():
        if shape is not None:
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    if q8_tensor:
        # 2 rows of 64 values: 2 blocks of 34 bytes per row (f16 scale + 32 int8)
        raw = rng.integers(0, 256, size=(2, 68), dtype=np.uint8)
        raw[:, 0:2] = raw[:, 34:36] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        w.add_tensor("extra.q8_0", raw, raw_shape=(2, 68), raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- raw writer ---------------------------------------------------------------------------


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    """One metadata entry: key string, u32 type, the already-encoded value."""
    return gstr(key) + struct.pack("<I", vtype) + payload


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, V.UINT32, struct.pack("<I", value))


def kv_str(key: str, value: str | bytes) -> bytes:
    return kv(key, V.STRING, gstr(value))


def tensor_info(name: str | bytes, ne: list[int], type_id: int, offset: int) -> bytes:
    return (
        gstr(name)
        + struct.pack("<I", len(ne))
        + struct.pack(f"<{len(ne)}Q", *ne)
        + struct.pack("<IQ", type_id, offset)
    )


def raw_gguf(
    kvs: list[bytes],
    tensors: list[bytes] | None = None,
    data: bytes = b"",
    *,
    version: int = 3,
    n_kv: int | None = None,
    n_tensors: int | None = None,
    alignment: int = 32,
    magic: bytes = b"GGUF",
    pad: bool = True,
) -> bytes:
    tensors = tensors or []
    head = magic + struct.pack("<I", version)
    head += struct.pack(
        "<QQ", len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    )
    head += b"".join(kvs) + b"".join(tensors)
    n_pad = -len(head) % alignment if pad else 0
    return head + b"\0" * n_pad + data
