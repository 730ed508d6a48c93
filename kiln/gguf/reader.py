"""Read a GGUF file (v2/v3) through the `gguf` package, memory-mapped: tensor data is never copied.

Every way a file can be wrong ends in a GGUFError that names the file and the problem.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from kiln.errors import GGUFError, KilnError
from kiln.gguf.fast_reader import FastGGUFReader
from kiln.gguf.header import check_header
from kiln.gguf.model import GGUFModel, RawTensor


def read_gguf(path: str | os.PathLike[str]) -> GGUFModel:
    """Open a GGUF file; metadata is decoded, tensors are uint8 views of the memory map."""
    path = Path(path)
    # The header is walked first with bounds checks, so that gguf's reader never sees a count
    # or length that runs past the end of the file (it would loop or allocate on those). It also
    # raises the GGUFError for a missing path, a directory or an unreadable file.
    check_header(path)
    file_size = path.stat().st_size
    try:
        # copy-on-write: the views are writable (torch wants that) and the file is never touched
        reader = FastGGUFReader(path, mode="c")
    except KilnError:
        raise
    except Exception as e:  # noqa: BLE001 - gguf raises ValueError/KeyError/IndexError on bad data
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None

    metadata: dict[str, Any] = {}
    metadata_types: dict[str, list[GGUFValueType]] = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        metadata[key] = _field_value(path, key, fld)
        metadata_types[key] = list(fld.types)

    tensors: dict[str, RawTensor] = {}
    for t in reader.tensors:
        tensors[t.name] = _raw_tensor(reader, t)

    version = int(reader.fields["GGUF.version"].parts[0][0])
    _release_header(reader)
    return GGUFModel(
        metadata, tensors, metadata_types, path=path, version=version, file_size=file_size
    )


def _release_header(reader: FastGGUFReader) -> None:
    """Drop the header's pages (metadata, tensor infos) from this process's memory: everything
    in them has been decoded into Python objects, and the map stays open for the tensors (their
    pages are the file's, unchanged; a later read maps them again). About 1.7 MB for the demo
    model's vocabulary, counted in `kiln run`'s peak RSS otherwise."""
    m = getattr(reader.data, "_mmap", None)
    length = int(reader.data_offset) // mmap.PAGESIZE * mmap.PAGESIZE
    if m is None or length == 0 or not hasattr(m, "madvise"):
        return
    try:
        m.madvise(mmap.MADV_DONTNEED, 0, length)
    except (OSError, ValueError):  # advice only
        pass


def _field_value(path: Path, key: str, fld) -> Any:
    try:
        value = fld.contents()
    except UnicodeDecodeError:
        raise GGUFError(f"{path}: metadata key {key!r} holds a string that is not UTF-8") from None
    except Exception as e:  # noqa: BLE001
        raise GGUFError(f"{path}: metadata key {key!r} cannot be decoded ({e})") from None
    if fld.types and fld.types[0] == GGUFValueType.BOOL and not isinstance(value, list):
        value = bool(value)
    return value


def _raw_tensor(reader: FastGGUFReader, t) -> RawTensor:
    """check_header has already bounded every dimension, checked rows against the block size
    and kept the data inside the file, so this only builds the view."""
    qtype = GGMLQuantizationType(int(t.tensor_type))
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    row_bytes = shape[-1] // block_size * type_size
    start = int(t.data_offset)
    raw = np.asarray(reader.data[start : start + t.n_bytes]).reshape(*shape[:-1], row_bytes)
    return RawTensor(t.name, qtype, shape, torch.from_numpy(raw))
