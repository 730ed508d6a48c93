"""`kiln make-model`: write a synthetic GGUF (real shapes, random weights) for benchmarks and
tests; llama.cpp loads it like a converted model."""

from __future__ import annotations

import argparse
import sys
import time

from kiln.cli import command


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from kiln.gguf.synthetic import PRESETS

    p.add_argument("--preset", required=True, help=f"model shape: {', '.join(PRESETS)}")
    p.add_argument(
        "--type", required=True, dest="qtype",
        help="a llama.cpp type mix (q4_k_m, q5_k_m, q6_k, q8_0, q4_0, ...) or a tensor type "
        "(f16, q4_k, ...)",
    )  # fmt: skip
    p.add_argument("-o", "--output", required=True, help="the GGUF file to write")
    p.add_argument("--vocab", help="take the tokenizer (and vocabulary size) from this GGUF")
    p.add_argument("--layers", type=int, help="number of layers, 1 to 512 (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="cpu", help="where to make the weights (cpu, cuda)")
    p.add_argument("--pure", action="store_true", help="every weight of the mix's main type")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


@command("make-model", "Write a synthetic GGUF model: real shapes, random weights.", _add_arguments)
def run(args: argparse.Namespace) -> int:
    from kiln.fileio import check_output_path
    from kiln.gguf.synthetic import get_preset, make_model_file, with_layers
    from kiln.llm import pick_device
    from kiln.quantize import parse_mix

    preset = get_preset(args.preset)
    mix = parse_mix(args.qtype, pure=args.pure)
    # the output path and --layers before anything is made; write_gguf then checks the disk
    # space for the file's size (an 8B preset in Q4_K_M is ~5 GB, its 512 layers ~60 GB)
    check_output_path(args.output, "the model")
    with_layers(preset, args.layers)
    device = pick_device(args.device)  # cuda without a GPU, meta, mps: a clear error
    start = time.perf_counter()
    path = make_model_file(
        preset, mix, args.output, layers=args.layers, vocab=args.vocab, device=device,
        seed=args.seed, progress=not args.quiet,
    )  # fmt: skip
    size = path.stat().st_size
    print(
        f"wrote {path}: {preset.name} {mix.name}, {size / 1e6:.1f} MB "
        f"in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    return 0
