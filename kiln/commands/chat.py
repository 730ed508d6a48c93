"""`kiln chat`: an interactive chat that uses the model's template and keeps the conversation.

The KV cache is kept between turns: each turn processes only its new tokens (the end of the
previous reply as the template writes it, the new message and the assistant header)."""

from __future__ import annotations

import argparse
import sys

from kiln.cli import command
from kiln.commands.common import (
    add_chat_template_args,
    add_model_args,
    add_sampling_args,
    chat_template_kwargs,
    load_llm,
    sampling_params,
)
from kiln.errors import UsageError
from kiln.runtime.generate import Completion, generate_stream

HELP = "commands: /reset forgets the conversation, /exit (or Ctrl-D) quits"


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--system", default=None, help="a system message to start the conversation")
    add_chat_template_args(p)
    add_sampling_args(p, max_tokens=512)


@command("chat", "Chat with a model interactively (uses its chat template).", _add_arguments)
def run(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    template_kwargs = chat_template_kwargs(args)  # bad JSON fails before the model loads
    llm = load_llm(args)
    template = {"chat_template": args.chat_template, "template_kwargs": template_kwargs}
    # no template, a bad one, or one that refuses a user turn: fail before the prompt
    llm.encode_chat([{"role": "user", "content": "hi"}], **template)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    print(f"kiln chat with {llm.path.name} on {llm.device} ({HELP})", file=sys.stderr)
    while True:
        if interactive:
            sys.stdout.write("\n> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(start)
            llm.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        try:
            ids = llm.encode_chat(messages, {"truncate": args.truncate}, **template)
        except UsageError as e:
            messages.pop()
            print(f"kiln chat: {e}", file=sys.stderr)
            continue
        result = Completion()
        pieces = generate_stream(llm.engine, llm.tokenizer, ids, params, result, llm.prompt_cache)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": result.text})
        print(result.stats.summary(), file=sys.stderr)
    return 0
