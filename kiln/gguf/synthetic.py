"""Synthetic models: the real shapes of known models (or tiny ones for tests) with random
weights, built in memory on any device or written to a GGUF file that llama.cpp loads.

Weights. Every weight matrix is N(0, 1/fan_in), fan_in being its row length (shape[-1]), so a
projection keeps the RMS of its input: after each RMSNorm q, k, v, gate and up have unit RMS,
attention scores q.k/sqrt(d) are about N(0, 1), and the residual stream grows like sqrt(layers),
finite through every layer in float16. token_embd rows get the same law (RMS 1/sqrt(n_embd),
0.016-0.031 for these models, about the 0.02 of usual inits), which keeps tied logits ~N(0, 1).
Norm weights are ones, Q/K/V biases N(0, 0.02^2), the MoE router N(0, 1/n_embd).

Speed. An 8B model holds 8 billion values; quantizing them all with the real K-quant search
would take many minutes. Instead, for each (type, fan_in) a pool of POOL_CHUNKS random chunks
(256 values, or one block when a row is not a multiple of 256) is quantized once with the real
quantizer (kiln.quant.quantize), and each tensor is filled by gathering pool rows (uint8) at
random indices. This is generic across formats (every byte is a block the real quantizer made)
and costs a gather per tensor. A tensor of at most DIRECT_MAX_CHUNKS chunks (every tensor of
the tiny presets) is quantized directly. Each tensor and pool has its own generator, seeded
from `seed` and its name, so the same seed on the same device gives the same bytes whatever
the order of making.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from kiln import quant
from kiln.config import ModelConfig, RopeScaling
from kiln.errors import UsageError
from kiln.gguf.lazy import LazyRawTensor
from kiln.gguf.model import GGUFModel, RawTensor
from kiln.quantize import Mix, MixContext, parse_mix, tensor_type
from kiln.tokenizer.bpe import byte_to_unicode

V = GGUFValueType
POOL_CHUNKS = 16384  # distinct quantized chunks per (type, fan_in): 4M values, 2.4 MB of Q4_K
# Bigger tensors sample from a pool. Direct quantization costs like a pool of the tensor's size
# (K-quants: ~1 ms per 256 values on 2 cores), so this bounds what a tensor adds to a pool's cost.
DIRECT_MAX_CHUNKS = 1024
BIAS_STD = 0.02


@dataclass(frozen=True)
class Preset:
    name: str
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int  # dense FFN; for a MoE, HF's intermediate_size (written, unused)
    n_vocab: int  # with the built-in tokenizer; a --vocab file brings its own count
    n_ctx: int
    rope_base: float
    rms_eps: float
    tied_output: bool
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_expert: int = 0
    add_bos: bool = False
    # llama 3.1 RoPE scaling (factor, low_freq_factor, high_freq_factor, original context),
    # written as the rope_freqs.weight factors llama.cpp's converter makes from it
    rope_llama3: tuple[float, float, float, int] | None = None

    @property
    def writes_head_dim(self) -> bool:
        """qwen3 GGUFs carry attention.key_length; others only when it is not n_embd/n_head."""
        return self.arch.startswith("qwen3") or self.head_dim * self.n_head != self.n_embd


# meta-llama/Meta-Llama-3-8B config.json
_LLAMA3_8B = Preset("llama3-8b", "llama", n_layer=32, n_embd=4096, n_head=32, n_head_kv=8,
                    head_dim=128, n_ff=14336, n_vocab=128256, n_ctx=8192, rope_base=500000.0,
                    rms_eps=1e-5, tied_output=False, add_bos=True)  # fmt: skip

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _LLAMA3_8B,
        # meta-llama/Llama-3.1-8B config.json: llama3-8b's shapes, a context of 131072 by
        # llama 3.1's RoPE scaling (the depth tables go past llama3-8b's 8192 with it)
        replace(_LLAMA3_8B, name="llama3.1-8b", n_ctx=131072, rope_llama3=(8.0, 1.0, 4.0, 8192)),
        # Qwen/Qwen2.5-0.5B: rows of 896 are not multiples of 256 (K-quant fallbacks)
        Preset("qwen2.5-0.5b", "qwen2", n_layer=24, n_embd=896, n_head=14, n_head_kv=2,
               head_dim=64, n_ff=4864, n_vocab=151936, n_ctx=32768, rope_base=1e6,
               rms_eps=1e-6, tied_output=True),
        # Qwen/Qwen3-0.6B: head_dim 128 != 1024 / 16
        Preset("qwen3-0.6b", "qwen3", n_layer=28, n_embd=1024, n_head=16, n_head_kv=8,
               head_dim=128, n_ff=3072, n_vocab=151936, n_ctx=40960, rope_base=1e6,
               rms_eps=1e-6, tied_output=True),
        # Qwen/Qwen3-8B
        Preset("qwen3-8b", "qwen3", n_layer=36, n_embd=4096, n_head=32, n_head_kv=8,
               head_dim=128, n_ff=12288, n_vocab=151936, n_ctx=40960, rope_base=1e6,
               rms_eps=1e-6, tied_output=False),
        # Qwen/Qwen3-30B-A3B: every layer MoE, 128 experts of 768, 8 used
        Preset("qwen3-30b-a3b", "qwen3moe", n_layer=48, n_embd=2048, n_head=32, n_head_kv=4,
               head_dim=128, n_ff=6144, n_vocab=151936, n_ctx=40960, rope_base=1e6,
               rms_eps=1e-6, tied_output=False, n_expert=128, n_expert_used=8,
               n_ff_expert=768),
        # Tiny models for tests: every row a multiple of 256 (K-quants); 0.7-1.3 MB in Q4_K_M,
        # 5-9 MB in F32.
        Preset("tiny-llama", "llama", n_layer=2, n_embd=256, n_head=4, n_head_kv=2,
               head_dim=64, n_ff=512, n_vocab=320, n_ctx=2048, rope_base=10000.0,
               rms_eps=1e-5, tied_output=False, add_bos=True),
        # llama 3.1-style rope_freqs factors, the original context scaled down to 256 so that
        # short prompts reach the scaled dims (all three bands: kept, smoothed, divided by 8)
        Preset("tiny-llama3", "llama", n_layer=2, n_embd=256, n_head=4, n_head_kv=2,
               head_dim=64, n_ff=512, n_vocab=320, n_ctx=2048, rope_base=500000.0,
               rms_eps=1e-5, tied_output=False, add_bos=True,
               rope_llama3=(8.0, 1.0, 4.0, 256)),
        Preset("tiny-qwen2", "qwen2", n_layer=2, n_embd=256, n_head=4, n_head_kv=2,
               head_dim=64, n_ff=512, n_vocab=320, n_ctx=2048, rope_base=1e6,
               rms_eps=1e-6, tied_output=True),
        Preset("tiny-qwen3", "qwen3", n_layer=2, n_embd=256, n_head=4, n_head_kv=2,
               head_dim=128, n_ff=512, n_vocab=320, n_ctx=2048, rope_base=1e6,
               rms_eps=1e-6, tied_output=True),
        Preset("tiny-qwen3moe", "qwen3moe", n_layer=2, n_embd=256, n_head=4, n_head_kv=2,
               head_dim=64, n_ff=512, n_vocab=320, n_ctx=2048, rope_base=1e6,
               rms_eps=1e-6, tied_output=False, n_expert=4, n_expert_used=2,
               n_ff_expert=256),
    ]
}  # fmt: skip


def get_preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    found = PRESETS.get(str(preset).lower())
    if found is None:
        raise UsageError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    return found


def build_model(
    preset: str | Preset,
    qtype_or_mix: str | Mix,
    *,
    layers: int | None = None,
    vocab: GGUFModel | str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> GGUFModel:
    """A synthetic model in memory: every RawTensor.data is a uint8 tensor on `device`. Its
    size is compared with the free memory of `device` before anything is made."""
    from kiln.gguf.lazy import raw_nbytes
    from kiln.limits import check_memory

    plan = _plan(preset, qtype_or_mix, layers, vocab)
    check_memory(
        sum(raw_nbytes(s.qtype, s.shape) for s in plan.specs),
        device,
        f"the synthetic model {plan.metadata['general.name']!r} "
        f"({plan.metadata[plan.metadata['general.architecture'] + '.block_count']} layers)",
        "use fewer layers (synthetic:PRESET:TYPE:LAYERS) or a smaller preset or type",
    )
    maker = _TensorMaker(seed, torch.device(device))
    tensors = {s.name: RawTensor(s.name, s.qtype, s.shape, maker.make(s)) for s in plan.specs}
    return GGUFModel(plan.metadata, tensors, plan.metadata_types)


def lazy_model(
    preset: str | Preset,
    qtype_or_mix: str | Mix,
    *,
    layers: int | None = None,
    vocab: GGUFModel | str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> GGUFModel:
    """The model build_model makes, with LazyRawTensors: each tensor is made when its data is
    read (and again at every read), so that write_gguf holds one tensor at a time."""
    plan = _plan(preset, qtype_or_mix, layers, vocab)
    maker = _TensorMaker(seed, torch.device(device))
    tensors: dict[str, Any] = {
        s.name: LazyRawTensor(s.name, s.qtype, s.shape, maker.maker(s)) for s in plan.specs
    }
    return GGUFModel(plan.metadata, tensors, plan.metadata_types)


def make_model_file(
    preset: str | Preset,
    qtype_or_mix: str | Mix,
    out_path: str | os.PathLike[str],
    *,
    layers: int | None = None,
    vocab: GGUFModel | str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write a synthetic model to `out_path`; tensors are made one at a time while writing, so
    memory holds one tensor (plus the pools), never the whole model. Same bytes as build_model
    with the same arguments."""
    from kiln.gguf.writer import write_gguf

    model = lazy_model(preset, qtype_or_mix, layers=layers, vocab=vocab, device=device, seed=seed)
    out_path = Path(out_path)
    write_gguf(model, out_path, progress=progress)
    return out_path


def plan_tensors(
    preset: str | Preset,
    qtype_or_mix: str | Mix,
    *,
    layers: int | None = None,
    vocab: GGUFModel | str | os.PathLike[str] | None = None,
) -> list[TensorSpec]:
    """The tensors (name, shape, type, init) a build would make, without making them."""
    return _plan(preset, qtype_or_mix, layers, vocab).specs


# ---------------------------------------------------------------------------------------------
# the plan: metadata and tensor list


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # torch order
    qtype: GGMLQuantizationType
    init: str  # "ones" | "normal" | "values"
    std: float = 0.0
    values: tuple[float, ...] = ()  # init "values": the tensor's values, row-major


@dataclass
class _Plan:
    metadata: dict[str, Any] = field(default_factory=dict)
    metadata_types: dict[str, list[GGUFValueType]] = field(default_factory=dict)
    specs: list[TensorSpec] = field(default_factory=list)

    def put(self, key: str, value: Any, vtype: GGUFValueType, sub: GGUFValueType | None = None):
        if vtype == V.FLOAT32:
            value = float(np.float32(value))  # the value a reader of the file will see
        self.metadata[key] = value
        self.metadata_types[key] = [vtype] if sub is None else [vtype, sub]


def _plan(preset, qtype_or_mix, layers, vocab) -> _Plan:
    preset = with_layers(get_preset(preset), layers)
    mix = parse_mix(qtype_or_mix)
    if vocab is None:
        tokenizer = builtin_tokenizer(preset.n_vocab, preset.add_bos)
    else:
        tokenizer = vocab_tokenizer(vocab)
        preset = replace(preset, n_vocab=tokenizer.n_vocab)
    plan = _Plan()
    _put_model_metadata(plan, preset, mix)
    plan.metadata.update(tokenizer.metadata)
    plan.metadata_types.update(tokenizer.metadata_types)
    shapes = _tensor_shapes(preset)
    ctx = MixContext.from_metadata(plan.metadata, shapes)
    plan.specs = [
        _spec(name, shape, tensor_type(mix, name, shape, ctx)) for name, shape in shapes.items()
    ]
    if preset.rope_llama3 is not None:
        factors = llama3_rope_factors(preset.head_dim, preset.rope_base, *preset.rope_llama3)
        plan.specs = [
            replace(s, init="values", values=factors) if s.name == "rope_freqs.weight" else s
            for s in plan.specs
        ]
    return plan


def llama3_rope_factors(
    rope_dim: int, base: float, factor: float, low: float, high: float, original: int
) -> tuple[float, ...]:
    """rope_freqs.weight of llama 3.1 RoPE scaling, as llama.cpp's convert_hf_to_gguf.py makes
    it: 1 for wavelengths under original / high, `factor` over original / low, smoothed between
    (the model divides each frequency by its factor)."""
    out = []
    for i in range(0, rope_dim, 2):
        wavelen = 2 * math.pi * base ** (i / rope_dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return tuple(out)


# The deepest real models have ~126 layers (llama 3.1 405B); more is a typo, and a file or a
# model in memory that size would not fit (qwen3-8b's layers are ~0.12 GB each in Q4_K_M).
MAX_LAYERS = 512


def with_layers(preset: Preset, layers: int | None) -> Preset:
    """The preset with `layers` layers (None: its own count), 1..MAX_LAYERS."""
    if layers is None:
        return preset
    if layers < 1:
        raise UsageError(f"--layers must be at least 1, got {layers}")
    if layers > MAX_LAYERS:
        raise UsageError(
            f"--layers must be at most {MAX_LAYERS} (the deepest real models have ~126), got "
            f"{layers}; the same bound applies to :LAYERS of synthetic:PRESET:TYPE:LAYERS"
        )
    return replace(preset, n_layer=layers)


def _put_model_metadata(plan: _Plan, p: Preset, mix) -> None:
    a = p.arch
    plan.put("general.architecture", a, V.STRING)
    plan.put("general.type", "model", V.STRING)
    plan.put("general.name", f"{p.name} synthetic {mix.name}", V.STRING)
    plan.put("general.file_type", int(mix.ftype), V.UINT32)
    plan.put("general.quantization_version", 2, V.UINT32)
    u32 = {
        "block_count": p.n_layer,
        "context_length": p.n_ctx,
        "embedding_length": p.n_embd,
        "feed_forward_length": p.n_ff,
        "attention.head_count": p.n_head,
        "attention.head_count_kv": p.n_head_kv,
    }
    if p.writes_head_dim:
        u32["attention.key_length"] = p.head_dim
        u32["attention.value_length"] = p.head_dim
    for key, value in u32.items():
        plan.put(f"{a}.{key}", value, V.UINT32)
    plan.put(f"{a}.attention.layer_norm_rms_epsilon", p.rms_eps, V.FLOAT32)
    plan.put(f"{a}.rope.freq_base", p.rope_base, V.FLOAT32)
    plan.put(f"{a}.rope.dimension_count", p.head_dim, V.UINT32)
    plan.put(f"{a}.vocab_size", p.n_vocab, V.UINT32)
    if p.n_expert:
        plan.put(f"{a}.expert_count", p.n_expert, V.UINT32)
        plan.put(f"{a}.expert_used_count", p.n_expert_used, V.UINT32)
        plan.put(f"{a}.expert_feed_forward_length", p.n_ff_expert, V.UINT32)


def preset_config(p: Preset) -> ModelConfig:
    """The ModelConfig a file of this preset reads back as."""
    return ModelConfig(
        arch=p.arch, name="", n_layer=p.n_layer, n_embd=p.n_embd, n_head=p.n_head,
        n_head_kv=p.n_head_kv, head_dim=p.head_dim, head_dim_v=p.head_dim,
        n_ff=p.n_ff, n_vocab=p.n_vocab, n_ctx_train=p.n_ctx, rms_eps=p.rms_eps,
        rope_base=p.rope_base, rope_dim=p.head_dim, rope_scaling=RopeScaling(),
        tied_output=p.tied_output, n_expert=p.n_expert, n_expert_used=p.n_expert_used,
        n_ff_expert=p.n_ff_expert, has_rope_freqs=p.rope_llama3 is not None,
    )  # fmt: skip


def _tensor_shapes(p: Preset) -> dict[str, tuple[int, ...]]:
    """config.expected_tensors in file order: token_embd, the layers, output_norm, output."""
    shapes = preset_config(p).expected_tensors()
    first = {k: v for k, v in shapes.items() if k == "token_embd.weight"}
    layers = {k: v for k, v in shapes.items() if k.startswith("blk.")}
    last = {k: v for k, v in shapes.items() if k not in first and k not in layers}
    return {**first, **layers, **last}


def _spec(name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType) -> TensorSpec:
    if name.endswith("norm.weight"):
        return TensorSpec(name, shape, qtype, "ones")
    if name.endswith(".bias"):
        return TensorSpec(name, shape, qtype, "normal", BIAS_STD)
    return TensorSpec(name, shape, qtype, "normal", 1.0 / math.sqrt(shape[-1]))


# ---------------------------------------------------------------------------------------------
# tensor data


class _TensorMaker:
    def __init__(self, seed: int, device: torch.device):
        self.seed, self.device = seed, device
        self.pools: dict[tuple, torch.Tensor] = {}

    def maker(self, spec: TensorSpec):
        return lambda: self.make(spec)

    def make(self, spec: TensorSpec) -> torch.Tensor:
        """uint8 [*shape[:-1], row_bytes] on the device."""
        if spec.init == "ones":
            values = torch.ones(spec.shape, device=self.device)
            return quant.quantize(values, spec.qtype)
        if spec.init == "values":
            values = torch.tensor(spec.values, device=self.device).reshape(spec.shape)
            return quant.quantize(values, spec.qtype)
        chunk = _chunk_values(spec.qtype, spec.shape[-1])
        n_chunks = math.prod(spec.shape) // chunk
        gen = self._generator(spec.name)
        if n_chunks <= DIRECT_MAX_CHUNKS:
            values = torch.randn(spec.shape, generator=gen, device=self.device) * spec.std
            return quant.quantize(values, spec.qtype)
        pool = self._pool(spec.qtype, spec.std, chunk)
        index = torch.randint(pool.shape[0], (n_chunks,), generator=gen, device=self.device)
        data = pool.index_select(0, index)  # [n_chunks, chunk_bytes]
        return data.reshape(*spec.shape[:-1], -1)

    def _pool(self, qtype: GGMLQuantizationType, std: float, chunk: int) -> torch.Tensor:
        key = (qtype, std, chunk)
        if key not in self.pools:
            gen = self._generator(f"pool:{qtype.name}:{std!r}:{chunk}")
            values = torch.randn(POOL_CHUNKS, chunk, generator=gen, device=self.device) * std
            self.pools[key] = quant.quantize(values, qtype)  # [POOL_CHUNKS, chunk_bytes]
        return self.pools[key]

    def _generator(self, name: str) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(zlib.crc32(f"{self.seed}:{name}".encode()))
        return gen


def _chunk_values(qtype: GGMLQuantizationType, n: int) -> int:
    """Values per pool entry: 256 where rows allow it, else one block."""
    block_size = GGML_QUANT_SIZES[qtype][0]
    return 256 if n % 256 == 0 and 256 % block_size == 0 else block_size


# ---------------------------------------------------------------------------------------------
# tokenizers

# A few GPT-2 merges so that the BPE path has work to do; each result is also a token.
_MERGES = [("Ġ", "t"), ("Ġ", "a"), ("h", "e"), ("i", "n"), ("r", "e"), ("o", "n"),
           ("Ġt", "he"), ("e", "r"), ("Ġ", "s"), ("a", "t"), ("Ġ", "w"), ("Ġ", "o"),
           ("e", "n"), ("Ġ", "c"), ("i", "t"), ("i", "s"), ("a", "n"), ("o", "r"),
           ("e", "s"), ("Ġ", "b")]  # fmt: skip
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3  # llama.cpp's llama_token_type


@dataclass(frozen=True)
class Tokenizer:
    """The tokenizer.* metadata of a GGUF file, with the value type of each key."""

    metadata: dict[str, Any]
    metadata_types: dict[str, list[GGUFValueType]]

    @property
    def n_vocab(self) -> int:
        return len(self.metadata["tokenizer.ggml.tokens"])


def builtin_tokenizer(n_vocab: int, add_bos: bool = False) -> Tokenizer:
    """A byte-level BPE tokenizer (llama.cpp's "gpt2" model, pre-tokenizer "default"): the 256
    byte tokens, a few merges, ChatML special tokens, then unused <|extra_N|> control tokens up
    to n_vocab (llama.cpp needs exactly one token per embedding row)."""
    tokens = list(byte_to_unicode()) + [a + b for a, b in _MERGES]
    types = [TOKEN_NORMAL] * len(tokens)
    special = {name: len(tokens) + i for i, name in enumerate(SPECIAL_TOKENS)}
    tokens += SPECIAL_TOKENS
    if n_vocab < len(tokens):
        raise UsageError(f"the built-in tokenizer needs a vocabulary of at least {len(tokens)}")
    tokens += [f"<|extra_{i}|>" for i in range(n_vocab - len(tokens))]
    types += [TOKEN_CONTROL] * (len(tokens) - len(types))
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [f"{a} {b}" for a, b in _MERGES],
        "tokenizer.ggml.bos_token_id": special["<|endoftext|>"],
        "tokenizer.ggml.eos_token_id": special["<|im_end|>"],
        "tokenizer.ggml.padding_token_id": special["<|endoftext|>"],
        "tokenizer.ggml.add_bos_token": add_bos,
        "tokenizer.chat_template": CHATML_TEMPLATE,
    }
    types_of = {
        "tokenizer.ggml.tokens": [V.ARRAY, V.STRING],
        "tokenizer.ggml.token_type": [V.ARRAY, V.INT32],
        "tokenizer.ggml.merges": [V.ARRAY, V.STRING],
        "tokenizer.ggml.add_bos_token": [V.BOOL],
        "tokenizer.ggml.model": [V.STRING],
        "tokenizer.ggml.pre": [V.STRING],
        "tokenizer.chat_template": [V.STRING],
    }
    return Tokenizer(meta, {k: types_of.get(k, [V.UINT32]) for k in meta})


def vocab_tokenizer(vocab: GGUFModel | str | os.PathLike[str]) -> Tokenizer:
    """Every tokenizer.* key of a GGUF file (or model), with its recorded type (or, for a model
    made in memory without one, the type the writer would give the value)."""
    if not isinstance(vocab, GGUFModel):
        from kiln.gguf.reader import read_gguf

        vocab = read_gguf(vocab)
    meta = {k: v for k, v in vocab.metadata.items() if k.startswith("tokenizer.")}
    if not meta.get("tokenizer.ggml.tokens"):
        raise UsageError(f"{vocab.source}: no tokenizer.ggml.tokens; pass a GGUF with a vocabulary")
    types = {k: vocab.metadata_types.get(k) or _inferred_type(k, v) for k, v in meta.items()}
    return Tokenizer(meta, types)


def _inferred_type(key: str, value: Any) -> list[GGUFValueType]:
    from kiln.gguf.writer import metadata_value_type

    vtype, sub = metadata_value_type(key, value)
    return [vtype] if sub is None else [vtype, sub]
