"""ModelConfig: every hyperparameter inference needs, read from GGUF metadata and checked
against the tensors, so that a model never starts on a file that contradicts itself."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kiln.errors import ConfigError, UnsupportedError

if TYPE_CHECKING:
    from kiln.gguf.model import GGUFModel


@dataclass(frozen=True)
class ArchSpec:
    """Everything that distinguishes an architecture; the one description of it (shared code
    reads these flags: config checks the tensors they imply, the decoder builds its blocks).
    Each kiln/models/<arch>.py registers its spec."""

    name: str
    rope_neox: bool  # qwen: rotate (i, i + d/2); llama GGUFs: adjacent pairs
    qkv_bias: bool = False  # qwen2: Q/K/V projections carry a bias
    qk_norm: bool = False  # qwen3: per-head RMSNorm of Q and K before RoPE
    moe: bool = False  # qwen3moe: routed experts replace the dense FFN in every model
    experts_optional: bool = False  # llama: Mixtral-style experts where expert_count > 0
    moe_normalize: bool = True  # renormalize the top-k router weights to sum to 1


ARCHITECTURES: dict[str, ArchSpec] = {}
ARCH_MODULES = ("llama", "qwen2", "qwen3", "qwen3_moe")  # kiln/models/<name>.py


def register_arch(spec: ArchSpec) -> ArchSpec:
    ARCHITECTURES[spec.name] = spec
    return spec


def architectures() -> dict[str, ArchSpec]:
    """The registry, filled by importing every architecture module (they import only this
    module, so this is cheap and never circular)."""
    if not ARCHITECTURES:
        import importlib

        for name in ARCH_MODULES:
            importlib.import_module(f"kiln.models.{name}")
    return ARCHITECTURES


def is_vocab_only(model: GGUFModel) -> bool:
    """llama.cpp's vocabulary files (ggml-vocab-*.gguf): a tokenizer and no tensors."""
    return not model.tensors and "tokenizer.ggml.tokens" in model.metadata


def check_has_weights(model: GGUFModel, what: str) -> None:
    """A GGUF without tensors cannot be run or quantized; a vocabulary-only file is named as
    such (its metadata also claims layers, which would otherwise be the complaint)."""
    if model.tensors:
        return
    if is_vocab_only(model):
        n = len(model.metadata["tokenizer.ggml.tokens"])
        raise ConfigError(
            f"{model.source} is a vocabulary-only GGUF (a tokenizer of {n} tokens, no weights), "
            f"like llama.cpp's ggml-vocab-*.gguf test files: there is nothing to {what}; "
            f"give a model file"
        )
    raise ConfigError(f"{model.source} holds no tensors (no weights): there is nothing to {what}")


@dataclass(frozen=True)
class RopeScaling:
    kind: str = "none"  # none | linear | yarn
    factor: float = 1.0
    original_context: int = 0


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int  # attention.key_length where present, else n_embd // n_head
    head_dim_v: int
    n_ff: int  # dense FFN size (0 for a model whose every FFN is MoE)
    n_vocab: int
    n_ctx_train: int
    rms_eps: float
    rope_base: float
    rope_dim: int
    rope_scaling: RopeScaling
    tied_output: bool  # no output.weight: the logits reuse token_embd
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_expert: int = 0
    has_rope_freqs: bool = False  # llama 3: per-dimension RoPE frequency factors tensor

    @property
    def spec(self) -> ArchSpec:
        return architectures()[self.arch]

    @property
    def moe(self) -> bool:
        """Routed experts in place of the dense FFN (qwen3moe; llama with expert_count > 0)."""
        return self.n_expert > 0

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim

    @classmethod
    def from_gguf(cls, model: GGUFModel) -> ModelConfig:
        check_has_weights(model, "run")
        src = model.source
        meta = model.metadata
        arch = meta.get("general.architecture")
        if arch is None:
            raise ConfigError(f"{src}: missing metadata key 'general.architecture'")
        if arch not in architectures():
            known = ", ".join(sorted(ARCHITECTURES))
            raise UnsupportedError(
                f"{src}: architecture {arch!r} is not supported by Kiln (supported: {known})"
            )
        spec = ARCHITECTURES[arch]
        keys = _Keys(src, meta, arch)

        n_embd = keys.int("embedding_length")
        n_head = keys.int("attention.head_count")
        n_head_kv = keys.int("attention.head_count_kv", default=n_head)
        if n_head_kv <= 0 or n_head % n_head_kv:
            raise ConfigError(
                f"{src}: attention.head_count={n_head} is not a multiple of "
                f"attention.head_count_kv={n_head_kv}"
            )
        if "attention.key_length" not in keys and n_embd % n_head:
            raise ConfigError(
                f"{src}: embedding_length={n_embd} is not divisible by head_count={n_head} "
                f"and {arch}.attention.key_length is missing"
            )
        head_dim = keys.int("attention.key_length", default=n_embd // n_head)
        head_dim_v = keys.int("attention.value_length", default=head_dim)
        reads_experts = spec.moe or spec.experts_optional
        n_expert = keys.int("expert_count", default=0, minimum=0) if reads_experts else 0
        n_expert_used = keys.int("expert_used_count", default=0, minimum=0) if n_expert else 0
        if (spec.moe or n_expert) and not (0 < n_expert_used <= n_expert):
            raise ConfigError(
                f"{src}: {arch} needs 0 < expert_used_count ({n_expert_used}) <= "
                f"expert_count ({n_expert})"
            )
        n_ff = keys.int("feed_forward_length", default=0 if spec.moe else None, minimum=0)
        # Mixtral-style llama GGUFs size their experts with feed_forward_length
        n_ff_expert = keys.int(
            "expert_feed_forward_length", default=n_ff if n_expert else 0, minimum=0
        )
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is not None and not isinstance(tokens, list):
            raise ConfigError(f"{src}: metadata key 'tokenizer.ggml.tokens' must be an array")
        embd = model.tensors.get("token_embd.weight")
        n_vocab_default = len(tokens) if tokens else (embd.shape[0] if embd is not None else None)
        rope_kind = str(meta.get(f"{arch}.rope.scaling.type", "none"))
        if rope_kind not in ("none", "linear", "yarn"):
            raise UnsupportedError(f"{src}: RoPE scaling type {rope_kind!r} is not supported")
        config = cls(
            arch=arch,
            name=str(meta.get("general.name", "")),
            n_layer=keys.int("block_count"),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            head_dim_v=head_dim_v,
            n_ff=n_ff,
            n_vocab=keys.int("vocab_size", default=n_vocab_default),
            n_ctx_train=keys.int("context_length"),
            rms_eps=keys.float("attention.layer_norm_rms_epsilon"),
            rope_base=keys.float("rope.freq_base", default=10000.0),
            rope_dim=keys.int("rope.dimension_count", default=head_dim),
            rope_scaling=RopeScaling(
                kind=rope_kind,
                factor=keys.float("rope.scaling.factor", default=1.0),
                original_context=keys.int(
                    "rope.scaling.original_context_length", default=0, minimum=0
                ),
            ),
            tied_output="output.weight" not in model.tensors,
            n_expert=n_expert,
            n_expert_used=n_expert_used,
            n_ff_expert=n_ff_expert,
            has_rope_freqs="rope_freqs.weight" in model.tensors,
        )
        if config.rope_dim > head_dim or config.rope_dim % 2:
            raise ConfigError(
                f"{src}: rope.dimension_count={config.rope_dim} must be even and at most the "
                f"head size {head_dim}"
            )
        # Each layer has tensors: bound block_count before building every layer's names.
        if config.n_layer > len(model.tensors):
            raise ConfigError(
                f"{src}: {arch}.block_count={config.n_layer} but the file has only "
                f"{len(model.tensors)} tensors"
            )
        check_tensors(config, model)
        return config

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape (torch order) this config requires."""
        e, v = self.n_embd, self.n_vocab
        shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (v, e)}
        shapes["output_norm.weight"] = (e,)
        if not self.tied_output:
            shapes["output.weight"] = (v, e)
        if self.has_rope_freqs:
            shapes["rope_freqs.weight"] = (self.rope_dim // 2,)
        spec = self.spec
        for i in range(self.n_layer):
            p = f"blk.{i}."
            shapes[p + "attn_norm.weight"] = (e,)
            shapes[p + "attn_q.weight"] = (self.q_dim, e)
            shapes[p + "attn_k.weight"] = (self.kv_dim, e)
            shapes[p + "attn_v.weight"] = (self.n_head_kv * self.head_dim_v, e)
            shapes[p + "attn_output.weight"] = (e, self.n_head * self.head_dim_v)
            if spec.qkv_bias:
                shapes[p + "attn_q.bias"] = (self.q_dim,)
                shapes[p + "attn_k.bias"] = (self.kv_dim,)
                shapes[p + "attn_v.bias"] = (self.n_head_kv * self.head_dim_v,)
            if spec.qk_norm:
                shapes[p + "attn_q_norm.weight"] = (self.head_dim,)
                shapes[p + "attn_k_norm.weight"] = (self.head_dim,)
            shapes[p + "ffn_norm.weight"] = (e,)
            if self.moe:
                x, f = self.n_expert, self.n_ff_expert
                shapes[p + "ffn_gate_inp.weight"] = (x, e)
                shapes[p + "ffn_gate_exps.weight"] = (x, f, e)
                shapes[p + "ffn_up_exps.weight"] = (x, f, e)
                shapes[p + "ffn_down_exps.weight"] = (x, e, f)
            else:
                shapes[p + "ffn_gate.weight"] = (self.n_ff, e)
                shapes[p + "ffn_up.weight"] = (self.n_ff, e)
                shapes[p + "ffn_down.weight"] = (e, self.n_ff)
        return shapes


def check_tensors(config: ModelConfig, model: GGUFModel) -> None:
    """Every tensor the config needs is present with the shape the metadata implies."""
    src = model.source
    missing = []
    for name, shape in config.expected_tensors().items():
        t = model.tensors.get(name)
        if t is None:
            missing.append(name)
        elif tuple(t.shape) != shape:
            raise ConfigError(
                f"{src}: tensor {name!r} has shape {list(t.shape)} but the metadata implies "
                f"{list(shape)} (arch {config.arch}, n_embd={config.n_embd}, n_head="
                f"{config.n_head}, n_head_kv={config.n_head_kv}, head_dim={config.head_dim}, "
                f"n_vocab={config.n_vocab})"
            )
    if missing:
        shown = ", ".join(missing[:5])
        if len(missing) > 5:
            shown += f" and {len(missing) - 5} more"
        raise ConfigError(
            f"{src}: missing {len(missing)} tensor(s) that a {config.arch} model with "
            f"{config.n_layer} layers needs: {shown}"
        )


class _Keys:
    """Typed access to `{arch}.*` metadata with errors that name the file and the key."""

    def __init__(self, src: str, meta: dict[str, Any], arch: str):
        self.src, self.meta, self.arch = src, meta, arch

    def __contains__(self, key: str) -> bool:
        return f"{self.arch}.{key}" in self.meta

    def _get(self, key: str, default: Any) -> Any:
        full = f"{self.arch}.{key}"
        if full in self.meta:
            return full, self.meta[full]
        if default is None:
            raise ConfigError(f"{self.src}: missing required metadata key {full!r}")
        return full, default

    def int(self, key: str, default: int | None = None, minimum: int = 1) -> int:
        full, value = self._get(key, default)
        if isinstance(value, list) and value:
            # Per-layer arrays (e.g. head_count_kv in some files): Kiln needs them uniform.
            if len(set(value)) != 1:
                raise UnsupportedError(
                    f"{self.src}: {full} varies per layer ({value[:8]}...); Kiln needs one value"
                )
            value = value[0]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value != int(value)
        ):
            raise ConfigError(f"{self.src}: key {full!r} must be an integer, not {value!r}")
        if int(value) < minimum:
            raise ConfigError(f"{self.src}: key {full!r} must be >= {minimum}, not {value}")
        return int(value)

    def float(self, key: str, default: float | None = None) -> float:
        full, value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ConfigError(f"{self.src}: metadata key {full!r} must be a number, got {value!r}")
        return float(value)
