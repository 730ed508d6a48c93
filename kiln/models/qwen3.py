"""qwen3: per-head RMSNorm of Q and K before RoPE (NeoX style); the head size comes from
attention.key_length and is independent of the embedding size."""

from __future__ import annotations

from kiln.config import ArchSpec, register_arch

register_arch(ArchSpec("qwen3", rope_neox=True, qk_norm=True))
