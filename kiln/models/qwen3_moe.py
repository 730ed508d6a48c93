"""qwen3moe: qwen3 attention; the FFN routes each token to the top-k of n_expert experts
(softmax over all experts, top-k, weights renormalized to sum to 1, as norm_topk_prob)."""

from __future__ import annotations

from kiln.models import register_model
from kiln.models.common import BlockStyle

register_model("qwen3moe", BlockStyle(rope_neox=True, moe=True, moe_normalize=True))
