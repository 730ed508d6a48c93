"""Kiln: run GGUF language models fast from Python.

import kiln
llm = kiln.LLM("smollm2-135m")
print(llm.generate("Once upon a time", max_tokens=32).text)
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Imported on first use so that `kiln --help` and the GGUF tools do not pay for the runtime.
    if name == "LLM":
        from kiln.llm import LLM

        return LLM
    if name == "SamplingParams":
        from kiln.runtime.sampler import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
