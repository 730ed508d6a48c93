"""FastGGUFReader builds exactly the fields upstream gguf.GGUFReader builds."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

from kiln.gguf.fast_reader import FastGGUFReader
from tests.conftest import shared_path


def _assert_same_fields(path) -> None:
    fast, ref = FastGGUFReader(path), GGUFReader(path)
    assert list(fast.fields) == list(ref.fields)
    for key, a in fast.fields.items():
        b = ref.fields[key]
        assert a.types == b.types, key
        assert a.data == b.data, key
        assert len(a.parts) == len(b.parts), key
        for x, y in zip(a.parts, b.parts):
            assert x.dtype == y.dtype and np.array_equal(x, y), key
        assert a.contents() == b.contents(), key
    assert [t.name for t in fast.tensors] == [t.name for t in ref.tensors]
    assert fast.data_offset == ref.data_offset


@pytest.mark.parametrize("name", ["llama-spm", "gpt-2"])  # qwen2: 13 s in upstream alone
def test_vocab_files(name):
    _assert_same_fields(shared_path("vocab", f"ggml-vocab-{name}.gguf"))


def test_stories(stories_model):
    _assert_same_fields(stories_model)


def test_demo_model(demo_model):
    _assert_same_fields(demo_model)
