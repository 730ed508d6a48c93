"""The `kiln` command. Each subcommand lives in kiln/commands/<name>.py and registers itself
with @command; errors a user can cause (KilnError) print one line and exit 1, no traceback.

The standard streams are the user's input too: a reader that goes away (`kiln run ... | head`)
ends the command quietly with 141 (128 + SIGPIPE, as a Unix tool killed by SIGPIPE); a full disk
or another write error on stdout (`> /dev/full`) is a one-line error; a descriptor closed at
start (`>&-`, `<&-`) is an error when the command first uses it."""

from __future__ import annotations

import argparse
import errno
import os
import signal
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
    _stand_in_for_closed_streams()
    name = "kiln"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "_run", None) is None:
            parser.print_help()
            return 2
        name = f"kiln {args.command}"
        from kiln.fusion import check_environment

        check_environment()
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # here, not at exit: a full disk or a gone reader is reported below
        return code
    except BrokenPipeError:
        _drop_stdout()  # the reader is gone: nothing more to say, to anyone
        return 128 + signal.SIGPIPE
    except KilnError as e:
        _report(f"{name}: error: {e}")
        return 1
    except KeyboardInterrupt:
        _report(f"{name}: interrupted")
        return 130
    except OSError as e:
        _report(f"{name}: error: {_os_error_message(e)}")
        return 1
    finally:
        _flush_or_drop_stdout()


def _report(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # stderr is gone too (`2>&1 | head`)


def _os_error_message(e: OSError) -> str:
    what = e.strerror or str(e)
    if e.filename is not None:
        return f"{e.filename}: {what}"
    if e.errno in _WRITE_ERRORS:  # a write to stdout (or to an open output file) has no name
        return f"cannot write the output: {what}"
    return what


_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's flush at exit does not fail again
    (and print "Exception ignored ... BrokenPipeError") with what is still buffered."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # not a real descriptor (a test's capture, the closed-stream stand-in)


def _flush_or_drop_stdout() -> None:
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        _drop_stdout()


class _ClosedStream:
    """sys.stdin / sys.stdout of a process started with that descriptor closed (`<&-`, `>&-`):
    Python leaves None there, and the first use fails with an AttributeError traceback. This
    stand-in says it is closed, and reading or writing raises OSError(EBADF) with a message."""

    closed = True
    encoding = "utf-8"

    def __init__(self, which: str, redirect: str):
        self.message = f"standard {which} is closed (the command was started with {redirect})"

    def _fail(self, *args, **kwargs):
        raise OSError(errno.EBADF, self.message)

    read = readline = readlines = write = writelines = fileno = _fail

    def __iter__(self):
        return self

    def __next__(self):
        self._fail()

    def isatty(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    writable = readable

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _stand_in_for_closed_streams() -> None:
    if sys.stdin is None:
        sys.stdin = _ClosedStream("input", "<&-")  # type: ignore[assignment]
    if sys.stdout is None:
        sys.stdout = _ClosedStream("output", ">&-")  # type: ignore[assignment]
    if sys.stderr is None:  # `2>&-`: messages have nowhere to go; never mix them into stdout
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process


if __name__ == "__main__":
    sys.exit(main())
