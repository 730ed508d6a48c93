"""llama (Llama 2/3, SmolLM2, TinyStories): RMSNorm, RoPE on adjacent pairs (llama.cpp's
converter permutes Q/K rows for that), GQA, SwiGLU FFN; llama 3 adds rope_freqs factors."""

from __future__ import annotations

from kiln.config import ArchSpec, register_arch

register_arch(ArchSpec("llama", rope_neox=False))
