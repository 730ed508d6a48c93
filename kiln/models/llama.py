"""llama (Llama 2/3, SmolLM2, TinyStories): RMSNorm, RoPE on adjacent pairs (llama.cpp's
converter permutes Q/K rows for that), GQA, SwiGLU FFN; llama 3 adds rope_freqs factors. With
expert_count > 0 the FFN is Mixtral's: routed experts (`ffn_*_exps`; softmax over the experts,
top-k, renormalized), as llama.cpp's llama architecture carries them."""

from __future__ import annotations

from kiln.config import ArchSpec, register_arch

register_arch(ArchSpec("llama", rope_neox=False, experts_optional=True))
