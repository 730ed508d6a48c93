"""Flags shared by the commands that run a model."""

from __future__ import annotations

import argparse

from kiln.fusion import parse_overrides
from kiln.runtime.sampler import SamplingParams

BACKEND_HELP = (
    "op backend: auto (default: the triton kernels on CUDA, else torch), torch (the reference) "
    "or triton"
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


def load_llm(args: argparse.Namespace):
    from kiln.llm import LLM

    return LLM(
        args.model,
        device=args.device,
        n_ctx=args.ctx_size,
        ubatch=args.ubatch,
        backend=args.backend,
        fusions=parse_overrides(args.fusion),
    )
