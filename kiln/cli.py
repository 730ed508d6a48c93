"""The `kiln` command. Each subcommand lives in kiln/commands/<name>.py and registers itself
with @command; errors a user can cause (KilnError) print one line and exit 1, no traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from kiln.errors import KilnError


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Decorator registering `run(args) -> exit code | None` as `kiln NAME`."""

    def wrap(run: Callable[[argparse.Namespace], int | None]):
        COMMANDS[name] = Command(name, help, add_arguments, run)
        return run

    return wrap


def build_parser() -> argparse.ArgumentParser:
    from kiln import __version__, commands

    commands.load_all()
    parser = argparse.ArgumentParser(
        prog="kiln", description="Run GGUF language models fast from Python."
    )
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KilnError as e:
        print(f"kiln {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kiln {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
