"""Command-line handling shared by the stage trainers: fixed flags plus ``--key=value`` overrides."""

from __future__ import annotations

import argparse
from typing import Any, Mapping, Sequence

from .config import ConfigError, build_config, parse_overrides


def stage_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with the flags every stage takes; stages add their own (``--data``, ``--out``, ...)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description,
        epilog="Any config value can be overridden as --key=value (e.g. --lr=2e-4 --epochs=3); "
               "an unknown key is an error.")
    parser.add_argument("--preset", default=None, help="named config: 'tiny' (CPU) or 'full' (GPU); default by device")
    parser.add_argument("--resume", action="store_true", help="continue from the output folder's checkpoint")
    parser.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: GPU when available)")
    return parser


def parse_stage_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
                     ) -> tuple[argparse.Namespace, dict[str, str]]:
    """Parse the fixed flags; everything else must be ``--key=value`` config overrides."""
    args, rest = parser.parse_known_args(argv)
    try:
        return args, parse_overrides(rest)
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def config_or_exit(parser: argparse.ArgumentParser, cls: type, presets: Mapping[str, Mapping[str, Any]],
                   preset: str | None, overrides: Mapping[str, str]) -> Any:
    """Build the stage config; a bad key or value ends the program with the parser's usage and the reason."""
    try:
        return build_config(cls, presets, preset, overrides)
    except ConfigError as err:
        parser.error(str(err))
