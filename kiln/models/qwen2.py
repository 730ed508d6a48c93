"""qwen2: llama's block with biases on the Q/K/V projections and NeoX-style RoPE."""

from __future__ import annotations

from kiln.models import register_model
from kiln.models.common import BlockStyle

register_model("qwen2", BlockStyle(rope_neox=True))
