"""qwen2: llama's block with biases on the Q/K/V projections and NeoX-style RoPE."""

from __future__ import annotations

from kiln.config import ArchSpec, register_arch

register_arch(ArchSpec("qwen2", rope_neox=True, qkv_bias=True))
