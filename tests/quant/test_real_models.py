"""Every tensor of the real models dequantizes bit-exactly like gguf's reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from kiln.gguf import read_gguf


def _check_all_tensors(path) -> int:
    model = read_gguf(path)
    ref = GGUFReader(path)
    checked = 0
    for t in ref.tensors:
        ours = model.tensors[t.name].dequantize()
        expected = torch.from_numpy(
            np.array(gguf_dequantize(t.data, t.tensor_type), dtype=np.float32, copy=True)
        )
        assert ours.shape == expected.shape, t.name
        same = ours.view(torch.int32) == expected.view(torch.int32)
        if not bool(same.all()):
            bad = (~same).nonzero()
            pytest.fail(
                f"{t.name} ({t.tensor_type.name}): {len(bad)} mismatches, first at "
                f"{bad[0].tolist()}: {ours[tuple(bad[0])]} vs {expected[tuple(bad[0])]}"
            )
        checked += 1
    return checked


def test_stories260k_every_tensor(stories_model):
    assert _check_all_tensors(stories_model) == 48


def test_demo_model_every_tensor(demo_model):
    assert _check_all_tensors(demo_model) == 272
