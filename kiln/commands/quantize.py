"""`kiln quantize IN OUT --type T`: requantize a GGUF model with llama.cpp's type mixes."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kiln.cli import command
from kiln.errors import UsageError


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="the GGUF file to read (or a known model name)")
    p.add_argument("output", help="the GGUF file to write (not the input)")
    p.add_argument(
        "--type", required=True, dest="qtype",
        help="a llama.cpp type mix (q4_k_m, q5_k_m, q6_k, q8_0, q4_0, ...) or a tensor type "
        "(f16, q4_k, ...)",
    )  # fmt: skip
    p.add_argument("--pure", action="store_true", help="every weight of the mix's main type")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


@command("quantize", "Requantize a GGUF model to a llama.cpp type mix.", _add_arguments)
def run(args: argparse.Namespace) -> int:
    from kiln.gguf.reader import read_gguf
    from kiln.gguf.writer import write_gguf
    from kiln.hub import resolve_model
    from kiln.quantize import parse_mix, quantize_model

    mix = parse_mix(args.qtype, pure=args.pure)  # a bad type fails before any reading
    source = resolve_model(args.input)
    output = Path(args.output)
    if output.exists() and output.resolve() == source.resolve():
        raise UsageError(f"{output} is the input file; write the result to another path")
    start = time.perf_counter()
    model = read_gguf(source)
    quantized = quantize_model(model, mix)
    write_gguf(quantized, output, progress=not args.quiet, desc=f"Quantizing to {mix.name}")
    print(
        f"wrote {output}: {mix.name}, {model.tensor_bytes / 1e6:.1f} MB -> "
        f"{output.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    return 0
