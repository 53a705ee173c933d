"""Command-line handling shared by the commands: the stage trainers' fixed flags plus ``--key=value`` overrides, the
command a result records, and the check of a result file before any work."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from . import distributed
from .config import build_config, choose_preset, parse_overrides, preset_reason
from .errors import UserError, add_debug_flag
from .stage import check_folder_path, check_training_folder, record_preset, remove_empty_folders
from .trainer import checkpoint_path


def command_line(program: str, argv: Sequence[str] | None = None) -> str:
    """The command a result was made by, as a shell would take it back: ``program`` and its arguments (``argv``,
    or the process's own), each quoted where it needs it."""
    return " ".join([program, shlex.join(sys.argv[1:] if argv is None else argv)]).rstrip()


def check_output_file(path: Path, flag: str, overwrite: bool) -> None:
    """Refuse, before any work, a result file that cannot be written (a folder, or a file where its folder should
    be) or that would replace an earlier result without ``overwrite``."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; pass a file path, e.g. {path / 'result.json'}")
    check_folder_path(path.parent, flag, named=path)
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists (an earlier result); pass another {flag}, or --overwrite to replace it")


def add_result_flags(parser: argparse.ArgumentParser, required: bool = False,
                     help: str = "write the result here (JSON)") -> None:
    """``--out FILE`` and ``--overwrite``, the flags of a command that writes one result file; pair with
    :func:`check_output_files` before any work."""
    parser.add_argument("--out", type=Path, required=required, help=help)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the result files already there (default: refuse)")


def _value(args: argparse.Namespace, flag: str) -> Any:
    return getattr(args, flag.lstrip("-").replace("-", "_"))


def _listed(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def check_counts(args: argparse.Namespace, *flags: str) -> None:
    """Refuse, before any work, a count below 1 in any of ``flags`` (one left unset, None, keeps its default)."""
    values = [_value(args, flag) for flag in flags]
    if any(value is not None and value < 1 for value in values):
        raise UserError(f"{_listed(flags)} must be at least 1, got {_listed([str(value) for value in values])}")


def comma_choices(text: str, flag: str, choices: Sequence[str]) -> list[str]:
    """The comma-separated items of ``text`` (what ``flag`` gave), each one of ``choices``; refuses, before any work,
    a list that names none of them or one that is not among them."""
    items = [item for item in text.split(",") if item]
    if not items or set(items) - set(choices):
        raise UserError(f"{flag} {text!r} names none or unknown parts; choose from {', '.join(choices)}, "
                        "comma-separated")
    return items


def check_output_files(args: argparse.Namespace, *flags: str) -> None:
    """:func:`check_output_file` for each of ``flags`` (e.g. ``"--out"``, ``"--plot"``) that was given, with
    ``args.overwrite``; one flag's file may not be another's."""
    given = {flag: Path(path) for flag in flags if (path := _value(args, flag)) is not None}
    for flag, path in given.items():
        check_output_file(path, flag, args.overwrite)
    by_file: dict[Path, str] = {}
    for flag, path in given.items():
        other = by_file.setdefault(path.resolve(), flag)
        if other != flag:
            raise UserError(f"{other} and {flag} are both {path}; pass a different file to each")


def stage_parser(prog: str, description: str, stage: str,
                 upstream: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """A parser with the flags every stage takes (``--data``, ``--out``, ``--preset``, ``--resume``,
    ``--overwrite``, ``--device``, ``--debug``) and a required ``--NAME FOLDER`` per stage in ``upstream``
    (name -> help)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description,
        epilog="Any config value can be overridden as --key=value (e.g. --lr=2e-4 --epochs=3); "
               "an unknown key is an error.")
    parser.add_argument("--data", required=True, help="image folder with metadata.jsonl, a hub id, or 'shapes'")
    for name, help_text in (upstream or {}).items():
        parser.add_argument(f"--{name}", required=True, help=help_text)
    parser.add_argument("--out", required=True, help=f"stage folder to write, e.g. runs/NAME/{stage}")
    parser.add_argument("--preset", default=None, help="named config: 'tiny' (CPU) or 'full' (GPU); default by device")
    parser.add_argument("--resume", action="store_true", help="continue from the output folder's checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a finished stage in the output folder (default: refuse)")
    parser.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: GPU when available)")
    add_debug_flag(parser)
    return parser


def parse_stage_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
                     ) -> tuple[argparse.Namespace, dict[str, str]]:
    """Parse the fixed flags; everything else must be ``--key=value`` config overrides."""
    args, rest = parser.parse_known_args(argv)
    return args, parse_overrides(rest)


def run_stage_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None, config_cls: type,
                  presets: Mapping[str, Mapping[str, Any]], train: Callable[..., Any], upstream: Sequence[str] = (),
                  checkpoints: Callable[[Path], list[Path]] = lambda out: [checkpoint_path(out)]) -> None:
    """Parse, build and validate the stage config (a bad key or value raises ``ConfigError`` before any work),
    refuse to replace a finished stage or an interrupted one's checkpoint (``checkpoints(out)``: the stage's,
    then its earlier phases') without ``--resume`` or ``--overwrite``, then call
    ``train(cfg, data, *upstream stage folders, out, resume=, device=)`` and record the preset in the stage's
    ``config.json``. A failure leaves no empty folder behind; the process group (under torchrun) is left
    however it ends."""
    args, overrides = parse_stage_args(parser, argv)
    cfg = build_config(config_cls, presets, args.preset, overrides)
    check_training_folder(args.out, checkpoints(Path(args.out)), args.resume, args.overwrite)
    preset, reason = choose_preset(args.preset), preset_reason(args.preset)
    if distributed.is_main():
        print(f"preset: {preset} ({reason})", flush=True)
    created = not Path(args.out).exists()
    try:
        train(cfg, args.data, *(getattr(args, name) for name in upstream), args.out, resume=args.resume,
              device=args.device)
        if distributed.is_main():
            record_preset(args.out, preset, reason)
    except BaseException:
        if created and distributed.is_main():
            remove_empty_folders(args.out)
        raise
    finally:
        distributed.cleanup()
