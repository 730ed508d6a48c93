"""Measurements, one module per tool, each imported by its command (nothing is imported here, so
`import kiln.bench.<tool>` stays cheap). `perplexity.py` is llama-perplexity: PPL and KL
divergence against a saved base (`kiln ppl`)."""

from __future__ import annotations
