"""The tuned mat-vec configs in kiln/kernels/configs (scripts/tune_matvec.py on a GPU): they are
read for the GPU they were measured on only, and each compiles for sm_90 at its shape."""

from __future__ import annotations

import json

import torch
from gguf.constants import GGMLQuantizationType

from kiln.kernels import config_name
from kiln.kernels import matvec as mv
from tests.kernels.sm90 import run_compile_check


def test_tuned_configs_apply_to_their_gpu_only(tmp_path, monkeypatch):
    monkeypatch.setattr(mv, "CONFIG_DIR", tmp_path)
    mv.tuned_configs.cache_clear()
    name = "NVIDIA Test GPU"
    (tmp_path / config_name("matvec", name)).write_text(
        json.dumps(
            {
                "Q8_0": {
                    "64x128": {"block_n": 2, "tile_values": 512, "num_warps": 8},
                    "64x128x8": {"block_n": 16, "tile_values": 1024, "num_warps": 4},
                }
            }
        )
    )
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    q8 = GGMLQuantizationType.Q8_0
    cuda = torch.device("cuda")
    try:
        assert mv.default_config(q8, 64, 128, 1, cuda) == mv.MatvecConfig(2, 512, 8)
        untuned = mv.default_config(q8, 64, 128, 1, cuda, tuned=False)
        assert untuned != mv.MatvecConfig(2, 512, 8)
        assert mv.default_config(q8, 64, 256, 1, cuda) == untuned  # another shape
        assert mv.default_config(q8, 64, 128, 1, torch.device("cpu")) == untuned
        assert mv.default_config(q8, 64, 128, 2, cuda) != mv.MatvecConfig(2, 512, 8)  # M > 1
        # The MoE launch of 8 experts of 64 x 128 has its own entry; 4 experts have none.
        assert mv.default_config(q8, 64, 128, 1, cuda, slots=8) == mv.MatvecConfig(16, 1024, 4)
        assert mv.default_config(q8, 64, 128, 1, cuda, slots=4) == untuned
    finally:
        mv.tuned_configs.cache_clear()


CODE = """
import json, torch
from gguf.constants import GGMLQuantizationType
from kiln import quant
from kiln.kernels import config_name
from kiln.kernels import matvec as mv
from kiln.kernels import moe
from kiln.weight import Weight
from tests.kernels.sm90 import compile_only

count = 0
for path in sorted(mv.CONFIG_DIR.glob("matvec,device=*.json")):
    for fmt, shapes in json.loads(path.read_text()).items():
        qtype = GGMLQuantizationType[fmt]
        for shape, c in shapes.items():
            n, k, slots = mv.parse_shape(shape)
            raw = quant.quantize(torch.zeros(1, k), qtype).expand(n, -1)  # no n x k quantizing
            cfg = mv.MatvecConfig(c["block_n"], c["tile_values"], c["num_warps"])
            with compile_only() as done:
                if slots == 1:
                    mv.matvec(torch.zeros(1, k), Weight(fmt, qtype, (n, k), raw.contiguous()), cfg)
                else:  # two experts, `slots` of them selected
                    w = Weight(fmt, qtype, (2, n, k), raw[None].expand(2, n, -1).contiguous())
                    ids = torch.zeros(1, slots, dtype=torch.long)  # one token's slots
                    moe.expert_linear(torch.zeros(1, k), ids, w, cfg)
            assert done, (fmt, shape)
            count += 1
print(count)
"""


def test_every_tuned_config_compiles_for_sm90():
    entries = sum(
        len(shapes)
        for path in mv.CONFIG_DIR.glob("matvec,device=*.json")
        for shapes in json.loads(path.read_text()).values()
    )
    assert int(run_compile_check(CODE).splitlines()[-1]) == entries
