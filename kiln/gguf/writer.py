"""Write a GGUFModel to a GGUF v3 file through gguf.GGUFWriter.

Metadata keeps the exact value types recorded in model.metadata_types (llama.cpp rejects a key
of the wrong type, e.g. an int32 block_count); keys without a recorded type are typed from their
Python value: ints as UINT32 (the type of every integer key llama.cpp reads, except the few in
_INT32_KEYS), floats as FLOAT32, lists of ints as INT32 arrays (tokenizer.ggml.token_type).

Tensors are streamed: the header (with every tensor's name, type and shape) is written first,
then each tensor's bytes are fetched, written and dropped before the next one. With a
LazyRawTensor (kiln.gguf.lazy) the bytes are made only at that moment, so writing a 5 GB model
needs one tensor's worth of memory. The file appears under its name only once it is complete
(kiln.fileio.atomic_output: a temporary file of its own, fsync, rename).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFWriter
from gguf.constants import GGUF_DEFAULT_ALIGNMENT, GGUFEndian, GGUFValueType
from gguf.gguf_writer import WriterState

from kiln.errors import UsageError
from kiln.fileio import atomic_output
from kiln.gguf.lazy import raw_nbytes
from kiln.gguf.model import GGUFModel

V = GGUFValueType

# Integer keys llama.cpp reads as int32 (everything else it reads as uint32).
_INT32_KEYS = frozenset(
    {
        "general.sampling.top_k",
        "general.sampling.penalty_last_n",
        "general.sampling.mirostat",
        "split.tensors.count",
    }
)
_INT_TYPES = {V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64}
_FLOAT_TYPES = {V.FLOAT32, V.FLOAT64}
_NUMPY_DTYPES = {
    V.UINT8: "<u1", V.INT8: "<i1", V.UINT16: "<u2", V.INT16: "<i2", V.UINT32: "<u4",
    V.INT32: "<i4", V.UINT64: "<u8", V.INT64: "<i8", V.FLOAT32: "<f4", V.FLOAT64: "<f8",
    V.BOOL: "?",
}  # fmt: skip
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def write_gguf(
    model: GGUFModel, path: str | os.PathLike[str], progress: bool = True, desc: str = "Writing"
) -> None:
    """Write `model` to `path` (GGUF v3). Tensors are written in model.tensors order; `desc`
    labels the progress bar (on stderr). The path is checked (a new name or a regular file) and
    the free disk space compared with the file's size before anything is written; the file
    appears whole or not at all (kiln.fileio.atomic_output)."""
    path = Path(path)
    arch = model.metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise UsageError(f"{model.source}: cannot write a model without general.architecture")
    writer = _StreamingWriter(None, arch)
    _add_metadata(writer, model)
    _add_tensor_infos(writer, model)
    size = estimate_size(model)
    with atomic_output(path, "wb", what="the model", size=size) as f:
        writer.use_file(f)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensor_data(writer, model, progress, desc)
        writer.flush()
        writer.fout = None  # atomic_output closes the file


def estimate_size(model: GGUFModel, alignment: int = GGUF_DEFAULT_ALIGNMENT) -> int:
    """Bytes of the file write_gguf makes of `model`: the tensor data, each padded to the
    alignment, plus a bound on the header (keys, values, tensor infos)."""
    align = int(model.metadata.get("general.alignment", alignment) or alignment)
    data = sum(-(-raw_nbytes(t.qtype, t.shape) // align) * align for t in model.tensors.values())
    header = 64 + sum(64 + len(name) + 8 * len(t.shape) for name, t in model.tensors.items())
    for key, value in model.metadata.items():
        header += 64 + len(key) + _value_bytes(value)
    return data + header + align


def _value_bytes(value: Any) -> int:
    if isinstance(value, (str, bytes)):
        return 8 + len(value.encode("utf-8") if isinstance(value, str) else value)
    if isinstance(value, (list, tuple)):
        return 12 + sum(_value_bytes(v) for v in value)
    return 8


def metadata_value_type(
    key: str, value: Any, declared: Sequence[GGUFValueType] | None = None
) -> tuple[GGUFValueType, GGUFValueType | None]:
    """(value type, array element type or None) that `key` is written with."""
    if declared:
        vtype = GGUFValueType(declared[0])
        if vtype != V.ARRAY:
            return vtype, None
        if len(declared) < 2:
            raise UsageError(f"metadata key {key!r}: array without an element type")
        sub = GGUFValueType(declared[1])
        if sub == V.ARRAY:
            raise UsageError(f"metadata key {key!r}: arrays of arrays cannot be written")
        return V.ARRAY, sub
    if isinstance(value, (list, tuple)):
        return V.ARRAY, _array_element_type(key, value)
    return _scalar_type(key, value), None


def _scalar_type(key: str, value: Any) -> GGUFValueType:
    if isinstance(value, (bool, np.bool_)):
        return V.BOOL
    if isinstance(value, (int, np.integer)):
        if key in _INT32_KEYS or value < 0:
            return V.INT32 if -(2**31) <= value < 2**31 else V.INT64
        return V.UINT32 if value < 2**32 else V.UINT64
    if isinstance(value, (float, np.floating)):
        return V.FLOAT32
    if isinstance(value, (str, bytes)):
        return V.STRING
    raise UsageError(f"metadata key {key!r}: cannot write a value of type {type(value).__name__}")


def _array_element_type(key: str, values: Sequence[Any]) -> GGUFValueType:
    if not values:
        raise UsageError(f"metadata key {key!r}: an empty array needs a declared element type")
    if all(isinstance(v, (str, bytes)) for v in values):
        return V.STRING
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        return V.BOOL
    if any(isinstance(v, (list, tuple)) for v in values):
        raise UsageError(f"metadata key {key!r}: arrays of arrays cannot be written")
    if any(isinstance(v, (float, np.floating)) for v in values):
        return V.FLOAT32
    return V.INT32  # as gguf's add_array types a list of ints (token_type is INT32)


def _add_metadata(writer: _StreamingWriter, model: GGUFModel) -> None:
    for key, value in model.metadata.items():
        if key == "general.architecture":
            continue  # GGUFWriter writes it first, from `arch`
        vtype, sub = metadata_value_type(key, value, model.metadata_types.get(key))
        value = _coerce(key, value, vtype, sub)
        if key == "general.alignment":
            writer.data_alignment = int(value)
        writer.add_key_value(key, value, vtype, sub)


def _coerce(key: str, value: Any, vtype: GGUFValueType, sub: GGUFValueType | None) -> Any:
    """The value as the Python type struct needs for vtype (numpy scalars, ints for floats)."""
    if vtype == V.ARRAY:
        assert sub is not None
        if not isinstance(value, (list, tuple, np.ndarray)):
            raise UsageError(f"metadata key {key!r} is declared an array but holds {value!r}")
        return [_coerce(key, v, sub, None) for v in value] if sub != V.STRING else list(value)
    try:
        if vtype in _INT_TYPES:
            return int(value)
        if vtype in _FLOAT_TYPES:
            return float(value)
        if vtype == V.BOOL:
            return bool(value)
    except (TypeError, ValueError):
        raise UsageError(f"metadata key {key!r}: {value!r} is not a {vtype.name}") from None
    return value


def _add_tensor_infos(writer: _StreamingWriter, model: GGUFModel) -> None:
    for name, t in model.tensors.items():
        # A dtype other than uint8 makes GGUFWriter take the shape as the element shape.
        writer.add_tensor_info(
            name, list(t.shape), np.dtype(np.float32), raw_nbytes(t.qtype, t.shape), t.qtype
        )


def _write_tensor_data(
    writer: _StreamingWriter, model: GGUFModel, progress: bool, desc: str
) -> None:
    from tqdm import tqdm

    total = sum(raw_nbytes(t.qtype, t.shape) for t in model.tensors.values())
    with tqdm(
        total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False
    ) as bar:
        for name, t in model.tensors.items():
            bar.set_postfix_str(name, refresh=False)
            array = _tensor_bytes(name, t)
            writer.write_tensor_data(array)
            bar.update(array.nbytes)
            del array


def _tensor_bytes(name: str, t) -> np.ndarray:
    """The tensor's GGUF bytes as a flat uint8 numpy array on the CPU."""
    data: torch.Tensor = t.data
    expected = raw_nbytes(t.qtype, t.shape)
    if data.dtype != torch.uint8 or data.numel() != expected:
        raise UsageError(
            f"tensor {name!r}: data is {data.numel()} {data.dtype} values, but a {t.qtype.name} "
            f"tensor of shape {list(t.shape)} needs {expected} bytes (uint8)"
        )
    return data.detach().to("cpu").contiguous().reshape(-1).numpy()


class _StreamingWriter(GGUFWriter):
    """GGUFWriter with fast packing of large metadata arrays (a 152k-token vocabulary packs in
    milliseconds instead of seconds) and support for empty arrays, writing to a file object it
    is given (GGUFWriter opens its path itself, with open(path, "wb"), following links)."""

    def use_file(self, f) -> None:
        """Write to the open binary file `f` (one file: no shards)."""
        if self.state is not WriterState.NO_FILE or len(self.tensors) != 1:
            raise ValueError("use_file needs a writer without an output file and one shard")
        self.fout = [f]
        self.state = WriterState.EMPTY

    def _pack_val(
        self, val: Any, vtype: GGUFValueType, add_vtype: bool, sub_type: GGUFValueType | None = None
    ) -> bytes:
        if vtype != V.ARRAY or self.endianess != GGUFEndian.LITTLE or sub_type is None:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        head = (_U32.pack(V.ARRAY) if add_vtype else b"") + _U32.pack(sub_type)
        head += _U64.pack(len(val))
        if sub_type == V.STRING:
            parts = []
            for item in val:
                encoded = item.encode("utf-8") if isinstance(item, str) else bytes(item)
                parts.append(_U64.pack(len(encoded)))
                parts.append(encoded)
            return head + b"".join(parts)
        if sub_type in _NUMPY_DTYPES:
            return head + np.asarray(val, dtype=_NUMPY_DTYPES[sub_type]).tobytes()
        return super()._pack_val(val, vtype, add_vtype, sub_type)
