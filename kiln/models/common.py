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
        c, ops = self.config, self.ops
        h = ops.embedding(self.w["token_embd.weight"], batch.tokens)
        x = ops.rms_norm(
            h, self.w["blk.0.attn_norm.weight"], c.rms_eps, **self._consumers(0, _ATTN)
        )
        for i in range(c.n_layer):
            attn = self._attention(i, x, batch, kv)
            h, x = ops.add_rms_norm(
                attn, h, self.w[f"blk.{i}.ffn_norm.weight"], c.rms_eps, **self._consumers(i, _FFN)
            )
            ffn = self._ffn(i, x)
            next_norm = (
                self.w[f"blk.{i + 1}.attn_norm.weight"]
                if i + 1 < c.n_layer
                else self.w["output_norm.weight"]
            )
            h, x = ops.add_rms_norm(ffn, h, next_norm, c.rms_eps, **self._consumers(i + 1, _ATTN))
        return x

    def _attention(self, i: int, x, batch, kv) -> torch.Tensor:
        c, ops, w, p = self.config, self.ops, self.w, f"blk.{i}."
        n = batch.tokens.shape[0]
        q_size, kv_size = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        if p + "attn_qkv.weight" in w:
            qkv = ops.linear(x, w[p + "attn_qkv.weight"], w.get(p + "attn_qkv.bias"))
            q = qkv[:, :q_size]
            k = qkv[:, q_size : q_size + kv_size]
            v = qkv[:, q_size + kv_size :]
        else:
            q = ops.linear(x, w[p + "attn_q.weight"], w.get(p + "attn_q.bias"))
            k = ops.linear(x, w[p + "attn_k.weight"], w.get(p + "attn_k.bias"))
            v = ops.linear(x, w[p + "attn_v.weight"], w.get(p + "attn_v.bias"))
        q = q.view(n, c.n_head, c.head_dim)
        k = k.view(n, c.n_head_kv, c.head_dim)
        v = v.view(n, c.n_head_kv, c.head_dim_v)
        q = ops.qkv_norm_rope(
            q,
            k,
            v,
            w.get(p + "attn_q_norm.weight"),
            w.get(p + "attn_k_norm.weight"),
            c.rms_eps,
            batch.positions,
            batch.slots,
            self.freqs,
            self.spec.rope_neox,
            kv.k[i],
            kv.v[i],
        )
        out = ops.attention(q, kv.k[i], kv.v[i], batch, self.scale)
        return ops.linear(out.reshape(n, c.n_head * c.head_dim_v), w[p + "attn_output.weight"])

    def _ffn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        ops, w, p = self.ops, self.w, f"blk.{i}."
        if self.config.moe:
            return self._moe(i, x)
        if p + "ffn_gate_up.weight" in w:
            gate, up = ops.linear(x, w[p + "ffn_gate_up.weight"]).chunk(2, dim=-1)
        else:
            gate = ops.linear(x, w[p + "ffn_gate.weight"])
            up = ops.linear(x, w[p + "ffn_up.weight"])
        act = ops.swiglu(gate, up, **self._consumers(i, _DOWN))
        return ops.linear(act, w[p + "ffn_down.weight"])

    def _moe(self, i: int, x: torch.Tensor) -> torch.Tensor:
        c, ops, w, p = self.config, self.ops, self.w, f"blk.{i}."
        weights, ids = ops.moe_route(
            x, w[p + "ffn_gate_inp.weight"], c.n_expert_used, self.spec.moe_normalize
        )
        merged = w.get(p + "ffn_gate_up_exps.weight")
        gate = merged if merged is not None else w[p + "ffn_gate_exps.weight"]
        up = None if merged is not None else w[p + "ffn_up_exps.weight"]
        return ops.moe_ffn(x, weights, ids, gate, up, w[p + "ffn_down_exps.weight"])


_QKV = (("attn_q", "attn_k", "attn_v"), "attn_qkv")
# The weights that read a layer's normed rows, merged or not (norm_quant's consumers).
_ATTN_INPUTS = ("attn_qkv.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight")
# MoE layers have none yet: their router and expert kernels read floats only.
_FFN_INPUTS = ("ffn_gate_up.weight", "ffn_gate.weight", "ffn_up.weight")
_DOWN_INPUTS = ("ffn_down.weight",)
_ATTN, _FFN, _DOWN = 0, 1, 2  # which consumers of a layer (DecoderModel._consumers)
_GATE_UP = (("ffn_gate", "ffn_up"), "ffn_gate_up")
_GATE_UP_EXPS = (("ffn_gate_exps", "ffn_up_exps"), "ffn_gate_up_exps")
