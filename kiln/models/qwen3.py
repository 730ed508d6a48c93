"""qwen3: per-head RMSNorm of Q and K before RoPE (NeoX style); the head size comes from
attention.key_length and is independent of the embedding size."""

from __future__ import annotations

from kiln.models import register_model
from kiln.models.common import BlockStyle

register_model("qwen3", BlockStyle(rope_neox=True))
