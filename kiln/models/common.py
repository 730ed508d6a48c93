"""The decoder blocks every supported architecture is built from.

A model calls only kiln.ops through its OpSet, so the same code runs the torch reference on any
device and, with another backend, the GPU kernels.
"""

from __future__ import annotations

import math

import torch

from kiln.config import ArchSpec, ModelConfig
from kiln.errors import UnsupportedError
from kiln.fusion import FusionPolicy
from kiln.ops import OpSet
from kiln.weight import Weight, concat_rows


class DecoderModel:
    """One decoder for every architecture; `policy` says which fusions it is built with.

    forward(batch, kv) runs one ForwardBatch (kiln/runtime/batch.py): prompt chunks, decode
    tokens or both, of any number of sequences, through the same code. Nothing in it depends on
    the batch's values on the host (only on its shapes and, in the reference ops, its host
    lengths), so a decode batch can be captured in a CUDA graph and replayed at every position.
    The model owns no cache: `kv` is the runtime's pool (kv.k[i], kv.v[i]: layer i's K/V rows).
    """

    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, Weight],
        ops: OpSet,
        policy: FusionPolicy,
    ):
        if config.rope_scaling.kind == "yarn":
            raise UnsupportedError(f"{config.name}: YaRN RoPE scaling is not implemented yet")
        self.config, self.w, self.ops, self.policy = config, weights, ops, policy
        self.spec: ArchSpec = config.spec
        self.device = weights["token_embd.weight"].device
        factors = weights.get("rope_freqs.weight")
        self.freqs = ops.rope_frequencies(
            config.rope_dim,
            config.rope_base,
            factors.dense() if factors is not None else None,
            self.device,
        )
        if config.rope_scaling.kind == "linear":
            self.freqs = self.freqs / config.rope_scaling.factor
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.lm_head = weights.get("output.weight", weights["token_embd.weight"])
        # layers whose weights were merged (a fusion can be on yet not apply to every layer)
        self.merged_qkv = self._merge(_QKV) if policy.merged_qkv else 0
        gate_up = _GATE_UP_EXPS if config.moe else _GATE_UP
        self.merged_gate_up = self._merge(gate_up) if policy.merged_gate_up else 0
        self.norm_inputs = self._norm_consumers() if policy.norm_quant else None
        # each layer's weights and op arguments looked up once: a decode step of a small model
        # is bound by its Python and torch calls, and names built and looked up per layer and
        # step cost about 10 us a layer (stories260K: 0.7 ms a token in all)
        self.blocks = [_Block(self, i) for i in range(config.n_layer)]
        self.q_size = config.n_head * config.head_dim
        self.kv_size = config.n_head_kv * config.head_dim

    def _norm_consumers(self) -> list[tuple]:
        """The norm_quant fusion: per layer, the weights that read the rows of its attention norm,
        of its FFN norm and of its SwiGLU (_ATTN, _FFN, _DOWN), and then those of the output norm
        (the op decides from them whether to quantize: kiln/ops/triton_backend.py)."""
        out = []
        for i in range(self.config.n_layer):
            p = f"blk.{i}."
            out.append(
                tuple(
                    tuple(self.w[p + n] for n in names if p + n in self.w)
                    for names in (_ATTN_INPUTS, _FFN_INPUTS, _DOWN_INPUTS)
                )
            )
        return [*out, ((self.lm_head,), (), ())]

    def _consumers(self, i: int, which: int) -> dict:
        """The consumers argument of an op whose rows layer i's weights `which` (_ATTN, _FFN,
        _DOWN; layer n_layer: the output norm's) read, when norm_quant is on."""
        return {} if self.norm_inputs is None else {"consumers": self.norm_inputs[i][which]}

    def _merge(self, names: tuple[tuple[str, ...], str]) -> int:
        """Concatenate each layer's (q, k, v) or (gate, up) weights (and biases) into one weight
        and drop the parts; -> the number of layers merged."""
        parts, merged_name = names
        count = 0
        for i in range(self.config.n_layer):
            p = f"blk.{i}."
            for suffix in ("weight", "bias"):
                keys = [f"{p}{n}.{suffix}" for n in parts]
                if not all(k in self.w for k in keys):
                    continue
                merged = concat_rows(f"{p}{merged_name}.{suffix}", [self.w[k] for k in keys])
                if merged is None:
                    break  # the weight parts differ in type: this layer stays unmerged
                self.w[merged.name] = merged
                for k in keys:
                    del self.w[k]
                count += suffix == "weight"
        return count

    def forward(self, batch, kv) -> torch.Tensor:
        """batch: a ForwardBatch whose tokens' K/V go to batch.slots of the pool `kv` ->
        logits float32 [R, n_vocab] of batch.logit_rows (every row when None)."""
        x = self._layers(batch, kv)
        if batch.logit_rows is not None:
            if batch.logit_rows.shape[0] == 0:  # a prompt chunk nobody reads the logits of
                return torch.empty((0, self.config.n_vocab), device=self.device)
            x = x.index_select(0, batch.logit_rows)
        return self.ops.linear(x, self.lm_head)

    def _layers(self, batch, kv) -> torch.Tensor:
        """The decoder stack -> the final-normed hidden states [T, n_embd]."""
        ops, eps, moe = self.ops, self.config.rms_eps, self.config.moe
        h = ops.embedding(self.w["token_embd.weight"], batch.tokens)
        first, last = self.blocks[0], self.blocks[-1]
        x = ops.rms_norm(h, first.attn_norm, eps, **first.attn_consumers)
        for b in self.blocks:
            attn = self._attention(b, x, batch, kv)
            h, x = ops.add_rms_norm(attn, h, b.ffn_norm, eps, **b.ffn_consumers)
            ffn = self._moe(b, x) if moe else self._ffn(b, x)
            # the output norm's consumer (lm_head) reads every row, or (a prompt chunk) only
            # logit_rows: then at another row count than the norm's, whose form it may not read
            # (Q8_0 at one row reads floats): the floats, with no consumers
            after = b.next_consumers if b is not last or batch.logit_rows is None else {}
            h, x = ops.add_rms_norm(ffn, h, b.next_norm, eps, **after)
        return x

    def _attention(self, b: _Block, x, batch, kv) -> torch.Tensor:
        c, ops = self.config, self.ops
        n = batch.tokens.shape[0]
        if b.qkv is not None:
            qkv = ops.linear(x, b.qkv, b.qkv_bias)
            q_size, kv_size = self.q_size, self.kv_size
            q = qkv[:, :q_size]
            k = qkv[:, q_size : q_size + kv_size]
            v = qkv[:, q_size + kv_size :]
        else:
            q = ops.linear(x, b.q, b.q_bias)
            k = ops.linear(x, b.k, b.k_bias)
            v = ops.linear(x, b.v, b.v_bias)
        q = q.view(n, c.n_head, c.head_dim)
        k = k.view(n, c.n_head_kv, c.head_dim)
        v = v.view(n, c.n_head_kv, c.head_dim_v)
        k_cache, v_cache = kv.k[b.index], kv.v[b.index]
        q = ops.qkv_norm_rope(
            q,
            k,
            v,
            b.q_norm,
            b.k_norm,
            c.rms_eps,
            batch.positions,
            batch.slots,
            self.freqs,
            self.spec.rope_neox,
            k_cache,
            v_cache,
        )
        # (where the pools store their rows rotated, kiln/quant/kv.py, qkv_norm_rope returned q
        # rotated like K, and attention rotates its output back)
        out = ops.attention(q, k_cache, v_cache, batch, self.scale)
        return ops.linear(out.reshape(n, c.n_head * c.head_dim_v), b.attn_output)

    def _ffn(self, b: _Block, x: torch.Tensor) -> torch.Tensor:
        ops = self.ops
        if b.gate_up is not None:
            gate, up = ops.linear(x, b.gate_up).chunk(2, dim=-1)
        else:
            gate = ops.linear(x, b.gate)
            up = ops.linear(x, b.up)
        act = ops.swiglu(gate, up, **b.down_consumers)
        return ops.linear(act, b.down)

    def _moe(self, b: _Block, x: torch.Tensor) -> torch.Tensor:
        c, ops = self.config, self.ops
        weights, ids = ops.moe_route(x, b.router, c.n_expert_used, self.spec.moe_normalize)
        return ops.moe_ffn(x, weights, ids, b.gate_exps, b.up_exps, b.down_exps)


class _Block:
    """Layer i's weights (None where the layer has none) and the consumers arguments of its
    norms and SwiGLU, read from the model's weights once they are merged."""

    __slots__ = (
        "index", "attn_norm", "ffn_norm", "next_norm", "qkv", "qkv_bias", "q", "q_bias", "k",
        "k_bias", "v", "v_bias", "q_norm", "k_norm", "attn_output", "gate_up", "gate", "up",
        "down", "router", "gate_exps", "up_exps", "down_exps", "attn_consumers",
        "ffn_consumers", "down_consumers", "next_consumers",
    )  # fmt: skip

    def __init__(self, model: DecoderModel, i: int):
        w, p = model.w, f"blk.{i}."
        self.index = i
        self.attn_norm = w[p + "attn_norm.weight"]
        self.ffn_norm = w[p + "ffn_norm.weight"]
        last = i + 1 == model.config.n_layer
        self.next_norm = w["output_norm.weight" if last else f"blk.{i + 1}.attn_norm.weight"]
        for name in ("qkv", "q", "k", "v"):
            setattr(self, name, w.get(f"{p}attn_{name}.weight"))
            setattr(self, name + "_bias", w.get(f"{p}attn_{name}.bias"))
        self.q_norm = w.get(p + "attn_q_norm.weight")
        self.k_norm = w.get(p + "attn_k_norm.weight")
        self.attn_output = w[p + "attn_output.weight"]
        moe = model.config.moe
        self.gate_up = None if moe else w.get(p + "ffn_gate_up.weight")
        self.gate = None if moe else w.get(p + "ffn_gate.weight")
        self.up = None if moe else w.get(p + "ffn_up.weight")
        self.down = None if moe else w[p + "ffn_down.weight"]
        self.router = self.gate_exps = self.up_exps = self.down_exps = None
        if moe:
            self.router = w[p + "ffn_gate_inp.weight"]
            # a merged gate+up goes in as `gate`, with `up` None (kiln.ops moe_ffn)
            merged = w.get(p + "ffn_gate_up_exps.weight")
            self.gate_exps = merged if merged is not None else w[p + "ffn_gate_exps.weight"]
            self.up_exps = None if merged is not None else w[p + "ffn_up_exps.weight"]
            self.down_exps = w[p + "ffn_down_exps.weight"]
        self.attn_consumers = model._consumers(i, _ATTN)
        self.ffn_consumers = model._consumers(i, _FFN)
        self.down_consumers = model._consumers(i, _DOWN)
        self.next_consumers = model._consumers(i + 1, _ATTN)


_QKV = (("attn_q", "attn_k", "attn_v"), "attn_qkv")
# The weights that read a layer's normed rows, merged or not (norm_quant's consumers). A MoE
# layer's FFN norm: the router and the experts' gate/up stacks (the SwiGLU rows of its slots
# are the triton backend's moe_ffn's own business).
_ATTN_INPUTS = ("attn_qkv.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight")
_FFN_INPUTS = (
    "ffn_gate_up.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_gate_inp.weight",
    "ffn_gate_up_exps.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight",
)  # fmt: skip
_DOWN_INPUTS = ("ffn_down.weight",)
_ATTN, _FFN, _DOWN = 0, 1, 2  # which consumers of a layer (DecoderModel._consumers)
_GATE_UP = (("ffn_gate", "ffn_up"), "ffn_gate_up")
_GATE_UP_EXPS = (("ffn_gate_exps", "ffn_up_exps"), "ffn_gate_up_exps")
