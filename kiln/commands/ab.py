"""`kiln ab A B`: two configurations of one benchmark, run interleaved (A B A B ...), with each
one's t/s, the ratio B/A, a verdict beyond the run-to-run spread, and a check that both generate
the same greedy tokens.

    kiln ab -m synthetic:tiny-llama:q8_0 -p 64 -n 16 "-ub 32" "-ub 64"
    kiln ab -m synthetic:qwen3-8b:q4_k_m -p 0 -n 128 --a "KILN_SWIGLU=0" --b "KILN_SWIGLU=1"

A and B hold -m, -b, -ub, --backend, --fusion NAME=0|1 and NAME=VALUE environment assignments;
"" is the defaults. A configuration may begin with a short option (`kiln ab "-m a.gguf" "-m
b.gguf" -n 16`): an argument with a space in it is a configuration, never an option.
The tests (-p, -n, -pg, -d), the rounds (-r) and the device are given once, for both.
"""

from __future__ import annotations

import argparse

from kiln.bench import gate
from kiln.cli import command
from kiln.commands.bench import add_test_arguments
from kiln.commands.common import apply_threads
from kiln.errors import UsageError
from kiln.hub import DEMO_MODEL


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_test_arguments(p, "512", "128")
    for action in p._actions:
        if action.dest == "repetitions":
            action.help = "rounds: repetitions of A then B (default 10)"
        elif action.dest == "model":
            action.help = (
                f"the model both run, unless a configuration sets its own -m: a GGUF file, "
                f"known name or synthetic:PRESET:TYPE[:LAYERS] (default {DEMO_MODEL})"
            )
    p.add_argument(
        "configs", nargs="*", metavar="A B",
        help='the two configurations, e.g. "-ub 32" "-ub 64" or "KILN_X=0" "KILN_X=1"',
    )  # fmt: skip
    p.add_argument("--a", metavar="FLAGS", help="configuration A (instead of the positional A)")
    p.add_argument("--b", metavar="FLAGS", help="configuration B (instead of the positional B)")
    p.add_argument(
        "--check-tokens", type=int, default=128, metavar="N",
        help="greedy tokens each configuration generates for the output check (0: none)",
    )  # fmt: skip
    p.add_argument(
        "--check", choices=("tokens", "kld"), default="tokens",
        help="the output check: greedy tokens identical (default), or also the KL divergence "
        "of B's next-token distributions from A's along A's tokens (for approximate changes "
        f"such as norm_quant; passes at {gate.describe().replace('%', '%%')})",
    )  # fmt: skip
    p._parse_optional = _configurations_stay_positional(p._parse_optional)  # type: ignore


def _configurations_stay_positional(parse_optional):
    """argparse reads the configuration "-m a.gguf" as -m with the value " a.gguf" (a known
    short option glued to its value). Here an argument whose first word is an option and which
    holds more words is a configuration (of A or B, or the value of --a/--b): the parser is told
    it is positional (None, in every Python from 3.10 on). "--opt=a b" stays an option."""

    def parse(arg_string: str):
        words = arg_string.split(None, 1)
        if len(words) == 2 and arg_string[:1] == "-" and "=" not in words[0]:
            return None
        return parse_optional(arg_string)

    return parse


def ab_params(args: argparse.Namespace):
    from kiln.bench import ab as AB
    from kiln.bench import llama_bench as B

    given = list(args.configs)
    texts = []
    for flag in ("a", "b"):
        value = getattr(args, flag)
        if value is None:
            if not given:
                raise UsageError(
                    'give two configurations: kiln ab [flags] "A FLAGS" "B FLAGS" '
                    '(e.g. "-ub 32" "-ub 64"), or --a FLAGS --b FLAGS'
                )
            value = given.pop(0)
        texts.append(value)
    if given:
        raise UsageError(f"more than two configurations given (extra: {' '.join(given)})")
    models = B.parse_models(args.model, DEMO_MODEL)
    if len(models) != 1:
        raise UsageError("kiln ab runs one model; to compare two, give A and B each its own -m")
    if args.check_tokens < 0:
        raise UsageError(f"--check-tokens must be >= 0, got {args.check_tokens}")
    if args.check == "kld" and args.check_tokens == 0:
        raise UsageError(
            "--check kld compares the distributions along --check-tokens tokens: give N > 0"
        )
    return AB.ABParams(
        model=models[0],
        a=AB.parse_config(texts[0], "A"),
        b=AB.parse_config(texts[1], "B"),
        n_prompt=B.parse_int_list(args.n_prompt, "-p", B.DEFAULT_N_PROMPT),
        n_gen=B.parse_int_list(args.n_gen, "-n", B.DEFAULT_N_GEN),
        n_pg=B.parse_pairs(args.pg),
        n_depth=B.parse_int_list(args.n_depth, "-d", B.DEFAULT_N_DEPTH),
        rounds=B.parse_reps(args.repetitions or AB.DEFAULT_ROUNDS),
        device=args.device,
        backend=args.backend,
        warmup=not args.no_warmup,
        check_tokens=args.check_tokens,
        check=args.check,
    )


@command(
    "ab", "A/B: two configurations interleaved, a verdict, and an output check.", _add_arguments
)
def run(args: argparse.Namespace) -> int:
    from kiln.bench import ab as AB
    from kiln.bench import llama_bench as B

    params = ab_params(args)
    apply_threads(args)
    result = AB.run_ab(params, progress=B.Progress(quiet=args.quiet, prefix="ab"))
    AB.print_report(result)
    return 0
