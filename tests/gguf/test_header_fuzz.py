"""Property: a GGUF file with a mutated header is either read or rejected with a KilnError.

Never another exception type, never a hang (each example runs under a 2 s alarm), and never an
allocation out of proportion to the file: the peak traced allocation while reading stays below
PEAK_FACTOR * max(file size, 1 MiB). The factor covers gguf's reader, which keeps a numpy view
per metadata array element (~150 B for a 1-4 B element, so a mutated uint8 array count
bounded by the file size costs ~150x its bytes); the tiny llama base reads with a ~160 kB
peak. A count that is trusted without a bounds check shows up as an allocation of GBs.

The base file is the tiny llama of builders.py (~4.8 kB: strings, arrays of strings, floats
and ints, a bool, 11 F32 tensors and one Q8_0 tensor). Mutations hit the header; truncation
anywhere. Runs derandomized with no example database, so CI sees the same 300 examples.
"""

from __future__ import annotations

import signal
import tempfile
import tracemalloc
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.constants import GGUFValueType
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from kiln.errors import KilnError
from kiln.gguf import read_gguf
from tests.gguf.builders import write_tiny_llama

PEAK_FACTOR = 8
TIME_LIMIT_S = 2.0
FUZZ_SETTINGS = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,  # the alarm below bounds each example; hypothesis deadlines cannot interrupt
    suppress_health_check=[HealthCheck.too_slow],
)

_TMP = tempfile.TemporaryDirectory(prefix="kiln-gguf-fuzz-")


@cache
def base() -> tuple[bytes, int, tuple[int, ...], tuple[tuple[int, str], ...]]:
    """(file bytes, header end, offsets of the integer fields (lengths, counts, types),
    (offset, numpy dtype, key) of each scalar metadata value)."""
    path = write_tiny_llama(Path(_TMP.name) / "base.gguf", q8_tensor=True)
    reader = GGUFReader(path)
    positions = {8, 16}  # tensor count, kv count
    values = []
    fields = [f for k, f in reader.fields.items() if not k.startswith("GGUF.")]
    for fld in fields + [t.field for t in reader.tensors]:
        off = fld.offset
        for part in fld.parts:  # the parts of a field lie back to back in the file
            if part.dtype.itemsize in (4, 8) and part.dtype.kind in "ui":
                positions.update(off + i * part.dtype.itemsize for i in range(min(len(part), 4)))
            off += int(part.nbytes)
        if fld in fields and len(fld.types) == 1 and fld.types[0] != GGUFValueType.STRING:
            values.append((off - int(fld.parts[-1].nbytes), fld.parts[-1].dtype.str, fld.name))
    return path.read_bytes(), int(reader.data_offset), tuple(sorted(positions)), tuple(values)


# Values that break naive readers; the symbolic ones are resolved against the file.
INTERESTING = (0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 16, 31, 32, 33, 99, 255, 256, 2**16,
               2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**60, 2**63 - 1, 2**63, 2**64 - 1,
               "size", "size-1", "size+1", "header", "-header")  # fmt: skip


def _resolve(v: int | str, size: int, header: int) -> int:
    if isinstance(v, int):
        return v
    return {"size": size, "size-1": size - 1, "size+1": size + 1, "header": header,
            "-header": 2**64 - header}[v]  # fmt: skip


# Scalar metadata values (block_count, head counts, eps, ...): what the config reads.
FLOATS = (0.0, -0.0, 1.0, -1.0, 0.5, 1e-30, 1e30, 3.4e38, float("inf"), float("-inf"),
          float("nan"))  # fmt: skip
INTS = (0, 1, 2, 3, 7, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**62, 2**63, 2**64 - 1,
        -1, -(2**31), -(2**63))  # fmt: skip

pos = st.integers(0, 2**16)  # taken modulo the header length when applied
mutation = st.one_of(
    st.tuples(st.just("flip"), pos, st.integers(0, 7)),
    st.tuples(st.just("byte"), pos, st.integers(0, 255)),
    st.tuples(
        st.just("int"),
        st.integers(0, 2**16),
        st.sampled_from((4, 8)),
        st.sampled_from(INTERESTING) | st.integers(0, 2**64 - 1),
    ),
    st.tuples(st.just("int_anywhere"), pos, st.sampled_from((4, 8)), st.sampled_from(INTERESTING)),
    st.tuples(
        st.just("value"), st.integers(0, 2**16), st.sampled_from(INTS), st.sampled_from(FLOATS)
    ),
    st.tuples(st.just("truncate"), st.integers(0, 2**16)),
    st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), pos, st.integers(1, 16)),
)


def mutate(ops: list[tuple]) -> bytes:
    data, header, positions, values = base()
    buf = bytearray(data)
    for op in ops:
        kind = op[0]
        if not buf:
            break
        h = min(header, len(buf))
        if kind == "flip":
            buf[op[1] % h] ^= 1 << op[2]
        elif kind == "byte":
            buf[op[1] % h] = op[2]
        elif kind in ("int", "int_anywhere"):
            at = positions[op[1] % len(positions)] if kind == "int" else op[1] % h
            width, value = op[2], _resolve(op[3], len(buf), header)
            buf[at : at + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
        elif kind == "value":
            at, dtype, _key = values[op[1] % len(values)]
            if at + np.dtype(dtype).itemsize <= len(buf):
                v = op[3] if dtype[1] == "f" else op[2] % 2 ** (8 * np.dtype(dtype).itemsize)
                raw = (
                    np.array(v).astype(dtype)
                    if dtype[1] == "f"
                    else v.to_bytes(np.dtype(dtype).itemsize, "little")
                )
                buf[at : at + len(bytes(raw))] = bytes(raw)
        elif kind == "truncate":
            del buf[op[1] % (len(buf) + 1) :]
        elif kind == "insert":
            at = op[1] % h
            buf[at:at] = op[2]
        elif kind == "delete":
            at = op[1] % h
            del buf[at : at + op[2]]
    return bytes(buf)


@contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise TimeoutError(f"reading a mutated file took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def describe(ops: list[tuple]) -> str:
    """The mutations, value ops named by their key, for the failure report."""
    values = base()[3]
    out = []
    for op in ops:
        if op[0] == "value":
            _at, dtype, key = values[op[1] % len(values)]
            out.append(f"{key} := {op[3] if dtype[1] == 'f' else op[2]} ({dtype})")
        else:
            out.append(repr(op))
    return "; ".join(out)


def check(ops: list[tuple], config: bool) -> None:
    if ops:  # note() only works inside a hypothesis example
        note(f"mutations: {describe(ops)}")
    data = mutate(ops)
    path = Path(_TMP.name) / "mutated.gguf"
    path.write_bytes(data)
    budget = PEAK_FACTOR * max(len(data), 1 << 20)
    tracemalloc.start()
    try:
        with time_limit(TIME_LIMIT_S):
            try:
                model = read_gguf(path)
                if config:
                    model.config  # noqa: B018
            except KilnError as e:
                assert "mutated.gguf" in str(e), f"message does not name the file: {e}"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= budget, f"peak traced allocation {peak} B > {budget} B for {len(data)} B"


def test_base_file_reads():
    data, header, positions, values = base()
    assert 0 < header < len(data) and len(positions) > 50 and len(values) > 8
    path = Path(_TMP.name) / "base.gguf"
    model = read_gguf(path)
    assert model.config.n_layer == 1
    check([], config=True)  # warm caches so the first example is not charged for them


@FUZZ_SETTINGS
@given(st.lists(mutation, min_size=1, max_size=4))
def test_mutated_header_reads_or_raises_kiln_error(ops):
    check(ops, config=False)


@FUZZ_SETTINGS
@given(st.lists(mutation, min_size=1, max_size=4))
def test_mutated_header_config_or_raises_kiln_error(ops):
    check(ops, config=True)


@FUZZ_SETTINGS
@given(
    st.lists(
        st.tuples(
            st.just("value"), st.integers(0, 2**16), st.sampled_from(INTS), st.sampled_from(FLOATS)
        ),
        min_size=1,
        max_size=3,
    )
)
def test_mutated_values_config_or_raises_kiln_error(ops):
    """Only scalar metadata values change: the file stays readable and the config must cope."""
    check(ops, config=True)
