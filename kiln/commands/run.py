"""`kiln run -p PROMPT`: stream a completion, then one line of prompt and generation speed."""

from __future__ import annotations

import argparse
import sys

from kiln.cli import command
from kiln.commands.common import add_model_args, add_sampling_args, load_llm, sampling_params
from kiln.runtime.generate import Completion, generate_stream


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("-p", "--prompt", required=True, help="the text to continue")
    add_sampling_args(p)


@command("run", "Generate text from a prompt, streaming it.", _add_arguments)
def run(args: argparse.Namespace) -> int:
    params = sampling_params(args)  # bad sampling values fail before the model loads
    llm = load_llm(args)
    ids = llm.encode_prompt(args.prompt, {"truncate": args.truncate})
    result = Completion()
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    for piece in generate_stream(llm.engine, llm.tokenizer, ids, params, result):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(result.stats.summary(), file=sys.stderr)
    return 0
