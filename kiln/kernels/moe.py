"""Launcher of the MoE decode mat-vec: the selected experts' mat-vecs of T tokens in one launch.

    expert_linear(x: [T, K] or [T * k, K] f16/bf16/f32 contiguous, ids: int32/int64 [T, k]
                  contiguous on the device, weight: Weight [n_expert, N, K]) -> [T * k, N] float32

Row s = t * k + j is x[t] @ W[ids[t, j]].T when x has T rows (gate/up: a token's k slots read
its row) or x[s] @ W[ids[t, j]].T when x has T * k rows (down: each slot reads its own SwiGLU
row); with k = 1 the two agree. The kernels are the decode mat-vec's
(kiln/kernels/triton/matvec.py with EXPERTS on): grid axis 1 runs over the T * k slots and each
program reads its expert id on the device, so nothing waits for the router on the host and the
launch can be captured in a CUDA graph. At T = 1 the kernels are the one-token launches' exactly
(SLOTS_PER_X = 1). A merged gate/up weight [n_expert, 2F, K] is just N = 2F. Its reference is
kiln.ops.reference.expert_linear.

ids must lie in [0, n_expert): they are read on the device and not checked (an out-of-range id
reads outside the weight).
"""

from __future__ import annotations

import torch

from kiln.kernels import matvec as _mv
from kiln.kernels.formats import SUPPORT
from kiln.weight import Weight

_ID_DTYPES = (torch.int32, torch.int64)
# Slots run on grid axis 1, which CUDA limits to 65535 programs.
MAX_SLOTS = 65535


def default_config(weight: Weight, slots: int) -> _mv.MatvecConfig:
    """Each slot is an M = 1 mat-vec of one expert: the config tuned for this expert shape and
    number of slots (T * k; scripts/tune_matvec.py, e.g. "1536x2048x8"), else the M = 1
    defaults."""
    _e, n, k = weight.shape
    return _mv.default_config(weight.qtype, n, k, 1, weight.device, slots=slots)


def expert_linear(
    x: torch.Tensor,
    ids: torch.Tensor,
    weight: Weight,
    config: _mv.MatvecConfig | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """x: [T, K] or [T * k, K]; ids: [T, k] -> [T * k, N] float32, row t * k + j =
    x[t or t * k + j] @ W[ids[t, j]].T."""
    assert x.dim() == 2 and x.is_contiguous(), (
        f"x must be a contiguous [T or T*k, K]; got {tuple(x.shape)}"
    )
    assert x.dtype in _mv._X_DTYPES, f"x must be f16/bf16/f32; got {x.dtype}"
    assert ids.dim() == 2 and ids.dtype in _ID_DTYPES, (
        f"ids must be a [T, k] int32/int64 tensor of expert ids; got {ids.dtype} {tuple(ids.shape)}"
    )
    assert ids.is_contiguous(), f"ids must be contiguous; got strides {ids.stride()}"
    assert len(weight.shape) == 3, f"need a [n_expert, N, K] weight; got {weight.shape}"
    assert weight.qtype in SUPPORT["expert_linear"], (
        f"expert_linear does not support {weight.qtype.name}"
    )
    t, used = ids.shape
    slots = t * used
    _e, n, k = weight.shape
    assert x.shape[1] == k, f"x has K={x.shape[1]}, weight {weight.name} has K={k}"
    assert x.shape[0] in (t, slots), (
        f"x must have one row per token ({t}: every expert of a token reads it) or one per slot "
        f"({t}*{used}={slots}); got {x.shape[0]}"
    )
    assert slots <= MAX_SLOTS, f"expert_linear launches at most {MAX_SLOTS} slots; got {slots}"
    assert x.device == weight.device == ids.device, (
        f"x on {x.device}, ids on {ids.device}, weight on {weight.device}"
    )
    raw = weight.raw
    assert raw is not None and raw.dtype == torch.uint8 and raw.dim() == 3 and raw.stride(2) == 1, (
        f"weight {weight.name}: raw must be uint8 [n_expert, N, row_bytes] with unit last stride"
    )
    out = torch.empty((slots, n), dtype=torch.float32, device=x.device)
    if slots == 0:
        return out
    cfg = config or default_config(weight, slots)
    _mv.launch(x, weight.qtype, raw, out, cfg, ids=ids, pdl=pdl)
    return out
