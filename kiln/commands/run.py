"""`kiln run -p PROMPT`: stream a completion, then one line of prompt and generation speed.

The prompt: -p TEXT, -f FILE (-f - for stdin), or stdin when neither is given and it is not a
terminal (`echo "Once upon a time" | kiln run`); a file or stdin loses one final newline, as
llama.cpp's -f does."""

from __future__ import annotations

import argparse
import sys

from kiln.cli import command
from kiln.commands.common import (
    add_model_args,
    add_sampling_args,
    load_llm,
    read_prompt,
    sampling_params,
)
from kiln.runtime.generate import Completion, generate_stream


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("-p", "--prompt", help="the text to continue")
    p.add_argument(
        "-f", "--file", metavar="FILE",
        help="read the prompt from FILE (- for stdin); without -p or -f a prompt piped to "
        "stdin is read",
    )  # fmt: skip
    p.add_argument(
        "--no-display-prompt", action="store_true",
        help="print only the generated text, not the prompt before it",
    )  # fmt: skip
    add_sampling_args(p)


@command("run", "Generate text from a prompt, streaming it.", _add_arguments)
def run(args: argparse.Namespace) -> int:
    params = sampling_params(args)  # bad sampling values fail before the model loads
    prompt = read_prompt(args.prompt, args.file)
    llm = load_llm(args)
    ids = llm.encode_prompt(prompt, {"truncate": args.truncate})
    result = Completion()
    if not args.no_display_prompt:
        sys.stdout.write(prompt)
        sys.stdout.flush()
    for piece in generate_stream(llm.engine, llm.tokenizer, ids, params, result):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(result.stats.summary(), file=sys.stderr)
    return 0
