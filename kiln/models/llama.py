"""llama (Llama 2/3, SmolLM2, TinyStories): RMSNorm, RoPE on adjacent pairs (llama.cpp's
converter permutes Q/K rows for that), GQA, SwiGLU FFN; llama 3 adds rope_freqs factors."""

from __future__ import annotations

from kiln.models import register_model
from kiln.models.common import BlockStyle

register_model("llama", BlockStyle(rope_neox=False))
