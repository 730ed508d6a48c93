"""The output gate of approximate changes (the q8_1 path of norm_quant, issue #14): B passes
against A when the mean KL divergence of its next-token distributions from A's is at most KLD_MAX
and their top-1 agree on at least TOP1_MIN of the tokens. kiln/bench/ab.py applies it (`kiln ab
--check kld`, `kiln tune` for approximate fusions); it lives apart, without torch, so the command
line can name it in its help."""

from __future__ import annotations

KLD_MAX = 2e-3  # mean KL divergence, nats
TOP1_MIN = 0.99  # same top-1, a fraction of the tokens


def describe() -> str:
    """'mean KLD <= 0.002 and same top-1 >= 99%'."""
    return f"mean KLD <= {KLD_MAX:g} and same top-1 >= {100 * TOP1_MIN:g}%"
