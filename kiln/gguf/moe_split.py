"""A Mixtral-style MoE llama made from a dense llama, exact by construction: the test model of
the MoE prompt path on real weights (ik_llama.cpp PR 728's lesson: a fast MoE path that moved
perplexity by 0.4% went unnoticed on random models).

Each layer's FFN of n_ff rows is split into n_expert experts of n_ff / n_expert rows (gate and
up: row slices; down: the matching column slices, times n_expert), the router is all zeros and
every expert is used: the softmax gives each expert 1 / n_expert, renormalized the same, so

    sum_e (1 / E) (E down_e) (silu(gate_e x) up_e x) = down (silu(gate x) up x)   (E = n_expert)

which is the dense FFN, exactly in real arithmetic (n_expert a power of two keeps the scaling
exact in floating point). Float weights only (F32, F16, BF16): the experts are written in F32.
"""

from __future__ import annotations

import dataclasses

import torch
from gguf.constants import GGMLQuantizationType, GGUFValueType

from kiln.errors import UnsupportedError
from kiln.gguf.model import GGUFModel, RawTensor

_FLOATS = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


def _f32(name: str, values: torch.Tensor) -> RawTensor:
    values = values.to(torch.float32).contiguous()
    raw = values.view(torch.uint8).reshape(*values.shape[:-1], values.shape[-1] * 4)
    return RawTensor(name, GGMLQuantizationType.F32, tuple(values.shape), raw)


def experts_from_dense(model: GGUFModel, n_expert: int) -> GGUFModel:
    """The dense llama `model` with every FFN split into n_expert routed experts (all used, a
    zero router): the same function, now through the MoE path."""
    meta = model.metadata
    if meta.get("general.architecture") != "llama":
        raise UnsupportedError("experts_from_dense makes a Mixtral-style llama: give a llama model")
    if n_expert < 1 or n_expert & (n_expert - 1):
        raise UnsupportedError(f"n_expert must be a power of two (exact scaling); got {n_expert}")
    n_ff = int(meta["llama.feed_forward_length"])
    if n_ff % n_expert:
        raise UnsupportedError(f"feed_forward_length {n_ff} is not a multiple of {n_expert}")
    f = n_ff // n_expert
    tensors = {}
    for name, t in model.tensors.items():
        part = name.rsplit(".", 2)
        if len(part) == 3 and part[1] in ("ffn_gate", "ffn_up", "ffn_down"):
            if t.qtype not in _FLOATS:
                raise UnsupportedError(
                    f"{name} is {t.qtype.name}: experts_from_dense splits float weights only "
                    "(requantize the model to F32 or F16 first)"
                )
            dense = t.dequantize()
            p = part[0] + "."
            if part[1] == "ffn_down":  # [n_embd, n_ff] -> [E, n_embd, f], scaled by E
                experts = dense.view(dense.shape[0], n_expert, f).permute(1, 0, 2) * n_expert
            else:  # [n_ff, n_embd] -> [E, f, n_embd]
                experts = dense.view(n_expert, f, dense.shape[1])
            exps = f"{p}{part[1]}_exps.weight"
            tensors[exps] = _f32(exps, experts)
            if part[1] == "ffn_gate":
                router = f"{p}ffn_gate_inp.weight"
                tensors[router] = _f32(router, torch.zeros(n_expert, dense.shape[1]))
        else:
            tensors[name] = t
    metadata = dict(meta)
    metadata["llama.expert_count"] = n_expert
    metadata["llama.expert_used_count"] = n_expert
    metadata["llama.feed_forward_length"] = f  # Mixtral's meaning: one expert's rows
    types = dict(model.metadata_types)
    types["llama.expert_count"] = [GGUFValueType.UINT32]
    types["llama.expert_used_count"] = [GGUFValueType.UINT32]
    return dataclasses.replace(
        model, metadata=metadata, tensors=tensors, metadata_types=types, path=None, _config=None
    )
