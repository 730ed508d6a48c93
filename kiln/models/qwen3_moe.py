"""qwen3moe: qwen3 attention; the FFN routes each token to the top-k of n_expert experts
(softmax over all experts, top-k, weights renormalized to sum to 1, as norm_topk_prob)."""

from __future__ import annotations

from kiln.config import ArchSpec, register_arch

register_arch(ArchSpec("qwen3moe", rope_neox=True, qk_norm=True, moe=True, moe_normalize=True))
