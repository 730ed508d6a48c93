"""Flags shared by the commands that run a model."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kiln.errors import UsageError
from kiln.fileio import decode_input_text, read_input_text
from kiln.fusion import parse_overrides
from kiln.runtime.sampler import SamplingParams

BACKEND_HELP = (
    "op backend: auto (default: the triton kernels on CUDA, cpu on the CPU), cpu (weights kept "
    "quantized), torch (the float32 reference) or triton"
)


def add_model_args(
    p: argparse.ArgumentParser,
    ctx_help: str = "context size in tokens (default: min(4096, the model's))",
    ubatch_help: str = "prompt tokens per forward pass (default 512)",
) -> None:
    p.add_argument(
        "-m",
        "--model",
        default="smollm2-135m",
        help="GGUF file or known model name (default: the demo model smollm2-135m)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument(
        "-c",
        "--ctx-size",
        type=int,
        default=None,
        help=ctx_help,
    )
    p.add_argument(
        "-ub",
        "--ubatch",
        type=int,
        default=512,
        help=ubatch_help,
    )
    add_backend_args(p)
    add_threads_arg(p)
    add_cache_type_args(p)
    add_llama_cpp_flags(p)


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-t", "--threads", type=int, default=None, metavar="N",
        help="CPU threads (torch's intra-op threads; default: the physical cores)",
    )  # fmt: skip


CACHE_TYPE_HELP = (
    "{which} cache type, as llama.cpp's -ct{w}: f32, f16, bf16, q8_0, q4_0 (q8_0/q4_0: blocks of "
    "32 along the head; default: f16 on the triton backend, f32 on the CPU){more}"
)


def add_cache_type_args(p: argparse.ArgumentParser, more: str = "") -> None:
    """-ctk / -ctv (kiln/quant/kv.py's types); values are checked where the engine is built
    (`more`: how a list is given, for kiln bench, which passes action="append")."""
    for which, w in (("K", "k"), ("V", "v")):
        p.add_argument(
            f"-ct{w}", f"--cache-type-{w}", metavar="TYPE",
            action="append" if more else "store",
            help=CACHE_TYPE_HELP.format(which=which, w=w, more=more),
        )  # fmt: skip


def check_cache_types(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """-ctk, -ctv as given (None: the backend's default), each name checked before a model
    loads (UsageError naming the valid types)."""
    from kiln.quant.kv import cache_type

    for flag, value in (("-ctk", args.cache_type_k), ("-ctv", args.cache_type_v)):
        if value is not None:
            cache_type(value, f"cache type for {flag}")
    return args.cache_type_k, args.cache_type_v


def apply_threads(args: argparse.Namespace) -> int:
    """Set -t/--threads (default: the physical cores) for this process -> the count."""
    from kiln.ops.cpu import set_threads

    return set_threads(args.threads)


class _GpuLayersNote(argparse.Action):
    """llama.cpp's -ngl N: accepted, with a note of what Kiln does instead."""

    def __call__(self, parser, namespace, values, option_string=None):
        for v in str(values).split(","):
            try:
                int(v)
            except ValueError:
                parser.error(f"{option_string}: expected a number of layers (e.g. 99), got {v!r}")
        setattr(namespace, self.dest, values)
        print(
            f"kiln: {option_string} {values} is not needed: Kiln puts the whole model on the GPU "
            "when there is one (--device auto); --device cpu keeps it on the CPU",
            file=sys.stderr,
        )


FLASH_ATTN_VALUES = ("on", "off", "auto", "1", "0")


class _FlashAttnNote(argparse.Action):
    """llama.cpp's -fa [on|off|auto] (llama-bench: -fa 0,1): accepted, with a note."""

    def __call__(self, parser, namespace, values, option_string=None):
        for v in str(values).split(","):
            if v not in FLASH_ATTN_VALUES:
                parser.error(
                    f"{option_string}: expected one of {', '.join(FLASH_ATTN_VALUES)}, got {v!r}"
                )
        setattr(namespace, self.dest, values)
        print(
            f"kiln: {option_string} changes nothing: Kiln's attention is always fused (flash "
            "attention over the cache for prompts, flash-decoding for generated tokens)",
            file=sys.stderr,
        )


def add_llama_cpp_flags(p: argparse.ArgumentParser) -> None:
    """-ngl and -fa as llama.cpp users type them: accepted, each with a one-line note on stderr
    of what Kiln does instead."""
    p.add_argument(
        "-ngl", "--n-gpu-layers", "--gpu-layers", action=_GpuLayersNote, metavar="N",
        help="accepted for llama.cpp habits: Kiln puts the whole model on the GPU when there "
        "is one (see --device)",
    )  # fmt: skip
    p.add_argument(
        "-fa", "--flash-attn", action=_FlashAttnNote, nargs="?", const="on",
        metavar="on|off|auto",
        help="accepted for llama.cpp habits: Kiln's attention is always fused",
    )  # fmt: skip


def add_chat_template_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--chat-template", metavar="FILE|NAME",
        help="the chat template to use instead of the model's: a file, a name of the model's "
        "(tokenizer.chat_template.NAME) or a built-in one (chatml, llama3); ./NAME for a file "
        "named like one",
    )  # fmt: skip
    p.add_argument(
        "--chat-template-kwargs", metavar="JSON",
        help='template variables as a JSON object, e.g. \'{"enable_thinking": false}\'',
    )  # fmt: skip


def chat_template_kwargs(args: argparse.Namespace) -> dict[str, Any] | None:
    """--chat-template-kwargs parsed (a JSON object), or None."""
    text = args.chat_template_kwargs
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(
            f"--chat-template-kwargs is not valid JSON ({e.msg} at character {e.pos}); give an "
            "object such as '{\"enable_thinking\": false}'"
        ) from None
    if not isinstance(value, dict):
        raise UsageError(
            f"--chat-template-kwargs must be a JSON object such as "
            f"'{{\"enable_thinking\": false}}', not a {type(value).__name__}"
        )
    return value


def add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", help=BACKEND_HELP)
    p.add_argument(
        "--fusion",
        action="append",
        metavar="NAME=0|1",
        help="switch a fusion on or off (repeatable; see `kiln fusions`)",
    )


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    d = SamplingParams()
    p.add_argument(
        "-n",
        "--n-predict",
        type=int,
        default=max_tokens,
        help=f"tokens to generate at most (default {max_tokens})",
    )
    p.add_argument("--temp", type=float, default=d.temperature, help="temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=d.top_k, help="0 = off")
    p.add_argument("--top-p", type=float, default=d.top_p, help="in (0, 1]; 1 = off")
    p.add_argument("--min-p", type=float, default=d.min_p, help="in [0, 1]; 0 = off")
    p.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty)
    p.add_argument("--repeat-last-n", type=int, default=d.repeat_last_n)
    p.add_argument("--presence-penalty", type=float, default=d.presence_penalty)
    p.add_argument("--frequency-penalty", type=float, default=d.frequency_penalty)
    p.add_argument("-s", "--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    p.add_argument(
        "--truncate",
        action="store_true",
        help="keep the end of a prompt longer than the context instead of failing",
    )


MAX_PROMPT_BYTES = 64 << 20  # far more than any context holds (a token is ~4 bytes of text)


def read_prompt(prompt: str | None, file: str | None) -> str:
    """The prompt of -p TEXT, -f FILE (- for stdin) or, with neither, a stdin that is not a
    terminal. A file or stdin loses one final newline (llama.cpp's -f does the same)."""
    if prompt is not None and file is not None:
        raise UsageError("give the prompt with -p TEXT or -f FILE, not both")
    if prompt is not None:
        return prompt
    if file is None:
        if sys.stdin is None or sys.stdin.closed or sys.stdin.isatty():
            raise UsageError(
                "no prompt: give -p TEXT, -f FILE, or pipe it in (echo TEXT | kiln run)"
            )
        file = "-"
    if file == "-":
        stream = getattr(sys.stdin, "buffer", None)
        try:
            if stream is not None:
                data = stream.read(MAX_PROMPT_BYTES + 1)
            else:  # a text-only stdin (tests, embedding)
                data = sys.stdin.read(MAX_PROMPT_BYTES + 1).encode("utf-8", "surrogatepass")
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read the prompt from stdin ({e}); give -p TEXT") from None
        hint = "more than any context holds: give a shorter one"
        text = decode_input_text(data, "the prompt on stdin", MAX_PROMPT_BYTES, hint=hint)
    else:
        text = read_input_text(file, "the prompt file (-f)", MAX_PROMPT_BYTES)
    return text[:-1] if text.endswith("\n") else text


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.n_predict,
        temperature=args.temp,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        repeat_last_n=args.repeat_last_n,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )


def load_llm(args: argparse.Namespace, **options):
    """The LLM the model flags describe; options: other LLM arguments (n_seq=...)."""
    from kiln.llm import LLM

    return LLM(
        args.model,
        device=args.device,
        n_ctx=args.ctx_size,
        ubatch=args.ubatch,
        backend=args.backend,
        fusions=parse_overrides(args.fusion),
        threads=getattr(args, "threads", None),
        cache_type_k=args.cache_type_k,
        cache_type_v=args.cache_type_v,
        **options,
    )
