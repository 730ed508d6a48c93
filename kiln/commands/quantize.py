"""`kiln quantize IN OUT TYPE` (as llama-quantize; `--type TYPE` also works): requantize a GGUF
model with llama.cpp's type mixes."""

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
    type_help = (
        "a llama.cpp type mix (q4_k_m, q5_k_m, q6_k, q8_0, q4_0, ...) or a tensor type "
        "(f16, q4_k, ...)"
    )
    p.add_argument("type", nargs="?", metavar="TYPE", help=type_help + ", as llama-quantize")
    p.add_argument("--type", dest="qtype", metavar="TYPE", help=type_help)
    p.add_argument("--pure", action="store_true", help="every weight of the mix's main type")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


@command("quantize", "Requantize a GGUF model to a llama.cpp type mix.", _add_arguments)
def run(args: argparse.Namespace) -> int:
    from kiln.gguf.reader import read_gguf
    from kiln.gguf.writer import write_gguf
    from kiln.hub import resolve_model
    from kiln.quantize import parse_mix, quantize_model

    mix = parse_mix(_type(args, parse_mix), pure=args.pure)  # a bad type fails before reading
    source = resolve_model(args.input)
    output = Path(args.output)
    if output.exists() and output.resolve() == source.resolve():
        raise UsageError(f"{output} is the input file; write the result to another path")
    from kiln.fileio import check_output_path

    check_output_path(output, "the quantized model")  # no device, FIFO, directory or link
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


def _type(args: argparse.Namespace, parse_mix) -> str:
    """The type of the positional TYPE or --type (one of them, or both the same)."""
    given, flag = args.type, args.qtype
    if given is not None and flag is not None and given.strip().lower() != flag.strip().lower():
        raise UsageError(f"two types given: {given} (TYPE) and --type {flag}; give one")
    qtype = given if given is not None else flag
    if qtype is None:
        hint = ""
        try:
            parse_mix(args.output)
            hint = f" ({args.output!r} was taken as the output file)"
        except UsageError:
            pass
        raise UsageError(f"give the type: kiln quantize IN OUT TYPE, e.g. q4_k_m{hint}")
    return qtype
