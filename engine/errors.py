"""User errors, and the command-line rule for them: one line, exit code 2, no traceback.

A ``UserError`` is a mistake in what was asked (a config key or value, a data source, a stage folder, a
generation input); its message names the problem and the fix. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn, TypeVar

# Set to 1 (or pass --debug) to see the traceback of a user error too.
DEBUG_ENV = "SCRATCH_DIFFUSION_DEBUG"
USER_ERROR_EXIT_CODE = 2

ResultT = TypeVar("ResultT")


class UserError(ValueError):
    """A mistake in the user's input; the message names the problem and the fix."""


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """List ``--debug`` in the ``--help`` of a command run through ``run_cli`` (which takes the flag out of
    ``sys.argv`` before ``main`` parses it)."""
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of a user error too (or set {DEBUG_ENV}=1)")


def _parser_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    raise UserError(f"{message} (see {parser.prog} --help)")


def run_cli(main: Callable[[], ResultT]) -> ResultT:
    """Run a command-line ``main``; a ``UserError`` prints ``error: MESSAGE`` and exits with code 2, and so does a
    flag the parser refuses (argparse would print its usage block first). An ``OSError`` about a file (a path that
    cannot be written or read: one given, or the disk) prints one line too, and exits with code 1.

    ``--debug`` anywhere on the command line (it is taken out before ``main`` parses it) or
    ``SCRATCH_DIFFUSION_DEBUG=1`` lets the exception through with its traceback.
    """
    debug = "--debug" in sys.argv[1:] or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    sys.argv[1:] = [arg for arg in sys.argv[1:] if arg != "--debug"]
    parser_error = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _parser_error  # for this command's parsers only: restored below
    try:
        return main()
    except UserError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT_CODE) from None
    except OSError as err:
        if debug or err.filename is None:  # one not about a file is a bug's, and keeps its traceback
            raise
        print(f"error: {err}; check the paths given and the disk (--debug shows where)", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        argparse.ArgumentParser.error = parser_error
