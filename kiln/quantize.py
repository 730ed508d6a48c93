"""llama.cpp's quantization type mixes (Q4_K_M & co.) and whole-model requantization.

`tensor_type` picks each tensor's type the way llama.cpp's llama_tensor_get_type does
(src/llama-quant.cpp), for the mixes Kiln can produce:

- Only weights with two or more dimensions are quantized; names not ending in "weight", norms
  ("_norm.weight", incl. qwen3's attn_q_norm/attn_k_norm) and the MoE router (ffn_gate_inp) keep
  the type they have (F32 in every converted model).
- output.weight, and token_embd.weight when the output is tied to it, become Q6_K (Q8_0 stays
  Q8_0; Q8_0 too when a row is not a multiple of the mix's block size). An untied token_embd keeps
  the mix's type. MXFP4_MOE: MXFP4 for 3-D expert tensors, Q8_0 for everything else.
- Q4_K_M / Q5_K_M: attn_v and ffn_down get Q6_K on the "use_more_bits" layers (the first and last
  eighth, and every third layer in between). Q4_K_S: attn_v of layers 0-3 and ffn_down of the
  first eighth get Q5_K. Models with 8 experts: attn_v and attn_k Q8_0, attn_output Q5_K (K mixes).
  70B llama: Q4_K attn_v becomes Q5_K.
- A row that is not a multiple of the chosen type's block falls back as llama.cpp's
  tensor_type_fallback does (TYPE_FALLBACK): Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K
  -> Q4_0, IQ4_XS -> IQ4_NL, and F16 when even that does not fit or the type has no smaller
  block (Q8_0, Q4_0, ... : stories260K's 172-wide ffn_down becomes F16 in a q8_0 file), with a
  warning per tensor like llama-quantize's (`fallbacks`).

A plain tensor type that is not also a llama.cpp file type (q4_k, q5_k, mxfp4, ...) means every
quantizable tensor of that type, as llama-quantize --pure does; `pure=True` does the same for a
mix name (e.g. every weight Q5_0 for "q5_0").
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType

from kiln import quant
from kiln.config import check_has_weights
from kiln.errors import UnsupportedError, UsageError
from kiln.gguf.lazy import LazyRawTensor, raw_row_bytes
from kiln.gguf.model import GGUFModel

Q = GGMLQuantizationType
F = LlamaFileType
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION

# mix name -> (llama.cpp file type, the type most tensors get)
MIXES: dict[str, tuple[LlamaFileType, GGMLQuantizationType]] = {
    "f32": (F.ALL_F32, Q.F32),
    "f16": (F.MOSTLY_F16, Q.F16),
    "bf16": (F.MOSTLY_BF16, Q.BF16),
    "q8_0": (F.MOSTLY_Q8_0, Q.Q8_0),
    "q4_0": (F.MOSTLY_Q4_0, Q.Q4_0),
    "q4_1": (F.MOSTLY_Q4_1, Q.Q4_1),
    "q5_0": (F.MOSTLY_Q5_0, Q.Q5_0),
    "q5_1": (F.MOSTLY_Q5_1, Q.Q5_1),
    "q4_k_s": (F.MOSTLY_Q4_K_S, Q.Q4_K),
    "q4_k_m": (F.MOSTLY_Q4_K_M, Q.Q4_K),
    "q5_k_s": (F.MOSTLY_Q5_K_S, Q.Q5_K),
    "q5_k_m": (F.MOSTLY_Q5_K_M, Q.Q5_K),
    "q6_k": (F.MOSTLY_Q6_K, Q.Q6_K),
    "mxfp4_moe": (F.MOSTLY_MXFP4_MOE, Q.MXFP4),
}
# The file type recorded for a pure plain type that is not itself a mix.
_PURE_FILE_TYPES = {
    Q.Q4_K: F.MOSTLY_Q4_K_S,
    Q.Q5_K: F.MOSTLY_Q5_K_S,
    Q.Q2_K: F.MOSTLY_Q2_K,
    Q.Q3_K: F.MOSTLY_Q3_K_S,
    Q.IQ4_NL: F.MOSTLY_IQ4_NL,
    Q.IQ4_XS: F.MOSTLY_IQ4_XS,
    Q.MXFP4: F.MOSTLY_MXFP4_MOE,
}
# llama.cpp's tensor_type_fallback (src/llama-quant.cpp): the type a tensor gets when its rows
# are not a multiple of its planned type's block (256 for these). A type not listed, or a
# fallback that does not fit either, gives F16 ("WARNING: must use F16 due to unusual shape").
TYPE_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0, Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0,
                 Q.IQ4_XS: Q.IQ4_NL}  # fmt: skip
LAST_FALLBACK = Q.F16  # block of 1: stores any row
_FLOAT_TYPES = {Q.F32, Q.F16, Q.BF16}
# llama.cpp's tensor_get_category: the first of these found in the name decides.
_CATEGORY_PARTS = (
    "attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight", "attn_k.weight", "attn_q.weight",
    "attn_output.weight", "ffn_up", "ffn_gate", "ffn_down",
)  # fmt: skip
_LAYER = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class Mix:
    name: str  # lower case, as accepted by parse_mix
    default: GGMLQuantizationType  # the type of most tensors
    ftype: LlamaFileType  # written to general.file_type
    pure: bool  # every quantizable tensor gets `default` (llama-quantize --pure)

    @property
    def is_quantized(self) -> bool:
        return self.default not in _FLOAT_TYPES


@dataclass(frozen=True)
class MixContext:
    """What llama.cpp's rules look at besides the tensor itself."""

    arch: str
    n_layer: int
    n_expert: int = 0
    tied_output: bool = False  # no output.weight: token_embd is also the output projection
    is_70b: bool = False  # llama.cpp's LLM_TYPE_70B (more bits for attn_v)

    @classmethod
    def from_model(cls, model: GGUFModel) -> MixContext:
        return cls.from_metadata(model.metadata, model.tensors)

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], tensor_names: Iterable[str]) -> MixContext:
        arch = str(meta.get("general.architecture", ""))
        n_layer = int(meta.get(f"{arch}.block_count", 0) or 0)
        n_head = meta.get(f"{arch}.attention.head_count", 0)
        n_head_kv = meta.get(f"{arch}.attention.head_count_kv", n_head)
        return cls(
            arch=arch,
            n_layer=n_layer,
            n_expert=int(meta.get(f"{arch}.expert_count", 0) or 0),
            tied_output="output.weight" not in set(tensor_names),
            # llama.cpp's quantizer calls a llama of 80 layers with GQA a 70B
            is_70b=arch == "llama" and n_layer == 80 and n_head != n_head_kv,
        )


def valid_type_names() -> list[str]:
    """Every name parse_mix accepts: the mixes, then plain types Kiln can quantize to."""
    return list(MIXES) + sorted(n for n in _quantizable_type_names() if n not in MIXES)


def _quantizable_type_names() -> set[str]:
    return {f.name.lower() for f in quant.FORMATS.values() if f.quantize_blocks is not None}


def parse_mix(name: str | Mix, pure: bool = False) -> Mix:
    """A mix from its name (case-insensitive): a llama.cpp file type or a plain tensor type."""
    if isinstance(name, Mix):
        return name if not pure or name.pure else Mix(name.name, name.default, name.ftype, True)
    key = str(name).strip().lower()
    if key in MIXES:
        ftype, default = MIXES[key]
        return Mix(key, default, ftype, pure or default in _FLOAT_TYPES)
    if key in _quantizable_type_names():
        qtype = Q[key.upper()]
        return Mix(key, qtype, _PURE_FILE_TYPES.get(qtype, F.GUESSED), True)
    raise UsageError(
        f"unknown quantization type {name!r}; valid types: {', '.join(valid_type_names())}"
    )


def tensor_type(
    mix: Mix | str,
    name: str,
    shape: tuple[int, ...],
    ctx: MixContext,
    current: GGMLQuantizationType = Q.F32,
) -> GGMLQuantizationType:
    """The type llama-quantize gives tensor `name` (torch-order `shape`, now of type `current`)."""
    return fallback_type(shape, planned_type(mix, name, shape, ctx, current))


def planned_type(
    mix: Mix | str,
    name: str,
    shape: tuple[int, ...],
    ctx: MixContext,
    current: GGMLQuantizationType = Q.F32,
) -> GGMLQuantizationType:
    """tensor_type before the fallback for rows the type cannot store."""
    mix = parse_mix(mix)
    if not allows_quantization(name, shape):
        return current
    new_type = mix.default
    if mix.is_quantized and not mix.pure:
        new_type = _mixed_type(mix, name, shape, ctx, new_type)
    return new_type


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp's tensor_allows_quantization for the tensors of Kiln's architectures."""
    return (
        _ggml_n_dims(shape) >= 2
        and name.endswith("weight")
        and "_norm.weight" not in name
        and "ffn_gate_inp.weight" not in name
    )


def _ggml_n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing ne of 1 (leading torch dims of 1) do not count."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return len(dims)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for part in _CATEGORY_PARTS:
        if part in name:
            return part.removesuffix(".weight")
    return "other"


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """The layers Q4_K_M/Q5_K_M give Q6_K: first and last eighth, and every third in between."""
    eighth = n_layer // 8
    return i_layer < eighth or i_layer >= 7 * n_layer // 8 or (i_layer - eighth) % 3 == 2


def _layer_index(name: str) -> int:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else 0


def _mixed_type(
    mix: Mix, name: str, shape: tuple[int, ...], ctx: MixContext, new_type: GGMLQuantizationType
) -> GGMLQuantizationType:
    category = _category(name)
    ftype = mix.ftype
    if category == "output" or (ctx.tied_output and category == "token_embd"):
        return _output_type(ftype, shape, new_type)
    if ftype == F.MOSTLY_MXFP4_MOE:
        return Q.MXFP4 if len(shape) >= 3 and shape[-3] > 1 else Q.Q8_0
    if category == "token_embd":
        return new_type
    i_layer, n_layer = _layer_index(name), ctx.n_layer
    if category in ("attn_v", "attn_qkv", "attn_kv_b"):
        return _attn_v_type(mix, ctx, i_layer, new_type)
    if category == "attn_k" and ctx.n_expert == 8:
        return Q.Q8_0
    if category == "ffn_down":
        return _ffn_down_type(ftype, i_layer, n_layer, new_type)
    if category == "attn_output" and ctx.n_expert == 8:
        return Q.Q5_K if ftype in (F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M) else new_type
    if category == "attn_qkv":
        return {F.MOSTLY_Q4_K_M: Q.Q5_K, F.MOSTLY_Q5_K_M: Q.Q6_K}.get(ftype, new_type)
    return new_type


def _output_type(
    ftype: LlamaFileType, shape: tuple[int, ...], new_type: GGMLQuantizationType
) -> GGMLQuantizationType:
    if ftype == F.MOSTLY_MXFP4_MOE or shape[-1] % GGML_QUANT_SIZES[new_type][0]:
        return Q.Q8_0
    return new_type if new_type == Q.Q8_0 else Q.Q6_K


def _attn_v_type(
    mix: Mix, ctx: MixContext, i_layer: int, new_type: GGMLQuantizationType
) -> GGMLQuantizationType:
    ftype = mix.ftype
    if ftype in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and use_more_bits(i_layer, ctx.n_layer):
        new_type = Q.Q6_K
    elif ftype == F.MOSTLY_Q4_K_S and i_layer < 4:
        new_type = Q.Q5_K
    if ctx.is_70b and new_type in (Q.Q3_K, Q.Q4_K):
        new_type = Q.Q5_K
    if ctx.n_expert == 8:
        new_type = Q.Q8_0
    return new_type


def _ffn_down_type(
    ftype: LlamaFileType, i_layer: int, n_layer: int, new_type: GGMLQuantizationType
) -> GGMLQuantizationType:
    if ftype in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and use_more_bits(i_layer, n_layer):
        return Q.Q6_K
    if ftype == F.MOSTLY_Q4_K_S and i_layer < n_layer // 8:
        return Q.Q5_K
    return new_type


def _fits(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> bool:
    return shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0


def fallback_type(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """qtype if it can store rows of shape[-1] values, else its TYPE_FALLBACK, else F16."""
    if _fits(shape, qtype):
        return qtype
    fallback = TYPE_FALLBACK.get(qtype)
    return fallback if fallback is not None and _fits(shape, fallback) else LAST_FALLBACK


def fallbacks(mix: Mix | str, model: GGUFModel) -> list[str]:
    """llama-quantize's warning for each tensor whose planned type cannot store its rows."""
    mix, ctx = parse_mix(mix), MixContext.from_model(model)
    lines = []
    for name, t in model.tensors.items():
        shape = tuple(t.shape)
        planned = planned_type(mix, name, shape, ctx, current=t.qtype)
        if _fits(shape, planned):
            continue
        final, listed = fallback_type(shape, planned), TYPE_FALLBACK.get(planned)
        why = ""
        if final != listed:  # llama-quantize: "WARNING: must use F16 due to unusual shape"
            why = f" ({listed.name} does not fit either)" if listed else " (an unusual shape)"
        lines.append(
            f"warning: {name}: rows of {shape[-1]} values are not a multiple of "
            f"{GGML_QUANT_SIZES[planned][0]} (required by {planned.name}): falling back to "
            f"{final.name}{why}"
        )
    return lines


def mix_types(mix: Mix | str, model: GGUFModel) -> dict[str, GGMLQuantizationType]:
    """Tensor name -> the type `mix` gives it in `model`."""
    mix, ctx = parse_mix(mix), MixContext.from_model(model)
    return {
        name: tensor_type(mix, name, tuple(t.shape), ctx, current=t.qtype)
        for name, t in model.tensors.items()
    }


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr)


def quantize_model(
    model: GGUFModel,
    mix: Mix | str,
    pure: bool = False,
    warn: Callable[[str], None] | None = _stderr_line,
) -> GGUFModel:
    """`model` requantized to `mix`, lazily: each tensor is dequantized and quantized only when
    its data is read (by write_gguf, one tensor at a time), so memory stays bounded. Tensors that
    keep their type are passed through byte for byte. Raises before any work if a tensor's type
    cannot be read or the target cannot be written by Kiln. Each fallback to another type (rows
    the planned type cannot store) is passed to `warn` (stderr by default; None: silent), with a
    count at the end, as llama-quantize prints them."""
    check_has_weights(model, "quantize")
    mix = parse_mix(mix, pure)
    types = mix_types(mix, model)
    if warn is not None:
        lines = fallbacks(mix, model)
        for line in lines:
            warn(line)
        if lines:
            n = len(model.tensors)
            warn(f"warning: {len(lines)} of {n} tensor(s) required fallback quantization")
    _check_convertible(model, types)
    tensors: dict[str, Any] = {}
    for name, t in model.tensors.items():
        new_type = types[name]
        if new_type == t.qtype:
            tensors[name] = t
        else:
            tensors[name] = LazyRawTensor(name, new_type, tuple(t.shape), _Requantize(t, new_type))
    metadata = dict(model.metadata)
    metadata_types = dict(model.metadata_types)
    metadata["general.quantization_version"] = QUANTIZATION_VERSION
    metadata["general.file_type"] = int(mix.ftype)
    for key in ("general.quantization_version", "general.file_type"):
        metadata_types[key] = [GGUFValueType.UINT32]
    return GGUFModel(metadata, tensors, metadata_types, path=None, version=model.version)


def _check_convertible(model: GGUFModel, types: dict[str, GGMLQuantizationType]) -> None:
    for name, new_type in types.items():
        cur = model.tensors[name].qtype
        if new_type == cur:
            continue
        src_fmt = quant.FORMATS.get(cur)
        if src_fmt is None:
            raise UnsupportedError(
                f"{model.source}: tensor {name!r} is {cur.name}, which Kiln cannot dequantize; "
                f"requantize from an F16/F32 (or Q8_0/K-quant) file instead"
            )
        dst_fmt = quant.FORMATS.get(new_type)
        if dst_fmt is None or dst_fmt.quantize_blocks is None:
            raise UnsupportedError(
                f"tensor {name!r} would become {new_type.name}, which Kiln cannot quantize to; "
                f"pick another type (valid: {', '.join(valid_type_names())})"
            )


class _Requantize:
    """Maker for a LazyRawTensor: dequantize the source and quantize it to the new type, in
    chunks of rows so that a big tensor (a 128k x 4096 embedding) never has a whole float32
    copy in memory."""

    CHUNK_VALUES = 1 << 24  # 64 MiB of float32 per chunk

    def __init__(self, source, new_type: GGMLQuantizationType):
        self.source, self.new_type = source, new_type

    def __call__(self) -> torch.Tensor:
        src = self.source
        n = src.shape[-1]
        raw = src.data.reshape(-1, src.data.shape[-1])  # uint8 [rows, src_row_bytes]
        row_bytes = raw_row_bytes(self.new_type, n)
        out = torch.empty(raw.shape[0], row_bytes, dtype=torch.uint8, device=raw.device)
        step = max(1, self.CHUNK_VALUES // n)
        for start in range(0, raw.shape[0], step):
            values = quant.dequantize(raw[start : start + step], src.qtype, n)
            out[start : start + step] = quant.quantize(values, self.new_type)
        return out.reshape(*src.shape[:-1], out.shape[-1])
