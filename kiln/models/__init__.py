"""build_model: a GGUF model's weights on a device, its op set chosen, its decoder built. Each
architecture file (llama.py, ...) registers its ArchSpec in kiln.config's registry."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kiln.config import ArchSpec, architectures
from kiln.errors import UnsupportedError
from kiln.fusion import FusionPolicy
from kiln.gguf.model import GGUFModel
from kiln.models.common import DecoderModel
from kiln.ops import get_ops, loaded, pack_for_kernel, resolve_backend
from kiln.weight import Weight


def build_model(
    model: GGUFModel,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    keep_dense: bool | None = None,
    fusions: Mapping[str, bool] | None = None,
) -> DecoderModel:
    """Put a GGUF model's weights on `device` and build its decoder.

    backend: "auto" (triton on CUDA, cpu on the CPU), "torch" (the reference), "triton" or
    "cpu" (weights kept quantized: packed at load, kiln/ops/cpu_pack.py).
    keep_dense (default: True on CPU, except for the cpu backend) keeps float32 copies of the
    weights for the reference ops.
    fusions: {name: on} overrides of the fusion policy (see kiln.fusion; env and defaults apply
    to the rest).
    """
    config = model.config
    spec = architectures().get(config.arch)
    if spec is None:
        raise UnsupportedError(f"{model.source}: no model implementation for {config.arch!r}")
    device = torch.device(device)
    backend = resolve_backend(backend, device)
    policy = FusionPolicy.resolve(device, backend, fusions)
    if keep_dense is None:
        keep_dense = device.type == "cpu" and backend != "cpu"
    weights = {name: Weight.from_raw(t, device, keep_dense) for name, t in model.tensors.items()}
    pack_for_kernel(backend, weights, _merge_groups(config, spec, policy))  # before any merge
    if keep_dense:
        # Dequantize at load rather than inside the first request, so that prompt speed is not
        # charged for it. An untied embedding is only ever read a row at a time.
        for name, w in weights.items():
            if name != "token_embd.weight" or config.tied_output:
                w.dense()
    decoder = DecoderModel(config, weights, get_ops(backend, dict(policy.states)), policy)
    loaded(backend)
    return decoder


def _merge_groups(config, spec: ArchSpec, policy: FusionPolicy) -> list[list[str]]:
    """The weights DecoderModel merges (merged_qkv, merged_gate_up), each layer's in order."""
    groups = []
    for i in range(config.n_layer):
        p = f"blk.{i}."
        if policy.merged_qkv:
            groups.append([p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"])
        if policy.merged_gate_up and not config.moe:
            groups.append([p + "ffn_gate.weight", p + "ffn_up.weight"])
    return groups
