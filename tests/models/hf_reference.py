"""Hugging Face transformers loading the same GGUF (gguf_file=, float32, CPU) as the reference.

Work-arounds for transformers 5.17 (each applied to the config before the weights load):
- qwen3 / qwen3moe: it ignores `attention.key_length` and assumes head size 128, so the head
  size is set from the GGUF's key_length;
- stories260K: its pad token id 4294967295 (-1 as uint32) is rejected, so pad_token_id is
  cleared (it plays no part in a forward pass);
- it needs `accelerate` installed (a test dependency);
- llama 3.1 RoPE scaling: it ignores the rope_freqs.weight factors, and the GGUF does not keep
  the parameters they were made from, so the caller passes them (`rope_llama3`) and they go
  into the config as HF's "llama3" rope type.

Its GGUF parsing goes through gguf.GGUFReader, twice per load (config, then weights), which takes
minutes on a 2-core machine for a 49k vocab; it is swapped for kiln's FastGGUFReader, whose
fields are identical to upstream's (tests/gguf/test_fast_reader.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import torch

from kiln.gguf import read_gguf
from kiln.gguf.fast_reader import FastGGUFReader

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_hf_model(path: Path, rope_llama3: tuple[float, float, float, int] | None = None):
    """rope_llama3: (factor, low_freq_factor, high_freq_factor, original context) of a file
    with llama 3.1 rope_freqs factors (kiln.gguf.synthetic.Preset.rope_llama3)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf.GGUFReader = FastGGUFReader  # transformers imports it from gguf when it loads
    path = Path(path)
    meta = read_gguf(path).metadata
    arch = meta["general.architecture"]
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    key_length = meta.get(f"{arch}.attention.key_length")
    if key_length is not None:
        config.head_dim = int(key_length)
    pad = getattr(config, "pad_token_id", None)
    if pad is not None and not 0 <= pad < config.vocab_size:
        config.pad_token_id = None
    if rope_llama3 is not None:
        factor, low, high, original = rope_llama3
        config.rope_parameters = {
            **config.rope_parameters,
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": original,
        }
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, config=config, dtype=torch.float32
    )
    return model.eval()


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()


@torch.no_grad()
def hf_greedy_agrees(model, prompt: list[int], continuation: list[int]) -> list[int]:
    """Positions where HF's argmax differs from `continuation` (greedy tokens from another
    engine). One teacher-forced forward pass checks every step: if HF's argmax after each prefix
    is the next token, HF's own greedy decoding produces exactly this continuation."""
    logits = hf_logits(model, prompt + continuation[:-1])[len(prompt) - 1 :]
    predicted = logits.argmax(-1).tolist()
    return [i for i, (a, b) in enumerate(zip(predicted, continuation)) if a != b]
