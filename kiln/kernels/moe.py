"""Launcher of the MoE decode mat-vec: the k selected experts' mat-vecs of one token in one launch.

    expert_linear(x: [1, K] or [k, K] f16/bf16/f32 contiguous, ids: int32/int64 [k] on the
                  device, weight: Weight [n_expert, N, K]) -> [k, N] float32

Slot s computes x[s or 0] @ W[ids[s]].T. The kernels are the decode mat-vec's
(kiln/kernels/triton/matvec.py with EXPERTS on): grid axis 1 runs over the slots and each
program reads its expert id on the device, so nothing waits for the router on the host and the
launch can be captured in a CUDA graph. x [1, K] is the gate/up case (every expert reads the
token), x [k, K] the down case (slot s reads its own SwiGLU row). A merged gate/up weight
[n_expert, 2F, K] is just N = 2F. Its reference is kiln.ops.reference.expert_linear.

ids must lie in [0, n_expert): they are read on the device and not checked (an out-of-range id
reads outside the weight).
"""

from __future__ import annotations

import torch

from kiln.kernels import matvec as _mv
from kiln.weight import Weight

SUPPORTED = _mv.SUPPORTED
_ID_DTYPES = (torch.int32, torch.int64)


def default_config(weight: Weight, slots: int) -> _mv.MatvecConfig:
    """Each slot is an M = 1 mat-vec of one expert: the config tuned for this expert shape and
    number of slots (scripts/tune_matvec.py, e.g. "1536x2048x8"), else the M = 1 defaults."""
    _e, n, k = weight.shape
    return _mv.default_config(weight.qtype, n, k, 1, weight.device, slots=slots)


def expert_linear(
    x: torch.Tensor,
    ids: torch.Tensor,
    weight: Weight,
    config: _mv.MatvecConfig | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """x: [1, K] or [k, K]; ids: [k] -> [k, N] float32, row s = x[s or 0] @ W[ids[s]].T."""
    assert x.dim() == 2 and x.is_contiguous(), f"x must be a contiguous [1 or k, K]; got {x.shape}"
    assert x.dtype in _mv._X_DTYPES, f"x must be f16/bf16/f32; got {x.dtype}"
    assert ids.dim() == 1 and ids.dtype in _ID_DTYPES, (
        f"ids must be a 1-D int32/int64 tensor of expert ids; got {ids.dtype} {tuple(ids.shape)}"
    )
    assert ids.stride(0) == 1 or ids.shape[0] <= 1, "ids must be contiguous"
    assert len(weight.shape) == 3, f"need a [n_expert, N, K] weight; got {weight.shape}"
    assert weight.qtype in _mv.FORMAT_IDS, f"expert_linear does not support {weight.qtype.name}"
    slots = ids.shape[0]
    _e, n, k = weight.shape
    assert x.shape[1] == k, f"x has K={x.shape[1]}, weight {weight.name} has K={k}"
    assert x.shape[0] in (1, slots), (
        f"x must have 1 row (shared by every expert) or one per slot ({slots}); got {x.shape[0]}"
    )
    assert x.device == weight.device == ids.device, (
        f"x on {x.device}, ids on {ids.device}, weight on {weight.device}"
    )
    raw = weight.raw
    assert raw.dtype == torch.uint8 and raw.dim() == 3 and raw.stride(2) == 1, (
        f"weight {weight.name}: raw must be uint8 [n_expert, N, row_bytes] with unit last stride"
    )
    out = torch.empty((slots, n), dtype=torch.float32, device=x.device)
    if slots == 0:
        return out
    cfg = config or default_config(weight, slots)
    _mv.launch(x, weight.qtype, raw, out, cfg, ids=ids, pdl=pdl)
    return out
