"""The command line: one flag per setting of ``service.config.Settings``, grouped for ``--help``.

argparse only collects the strings; pydantic validates them with the environment (a flag wins), so
a bad value is reported the same way whether it came from a flag or from ``DIGITSERVE_*``. A mistyped
flag is one line that suggests the closest real one.
"""

from __future__ import annotations

import argparse
import difflib
import types
import typing
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr
from pydantic.fields import FieldInfo

from service.config import GROUPS, Settings

PROG = "python -m service"


class CliError(Exception):
    """A command line that cannot be read: the message is one line for ``error: ...``."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise CliError(f"{message} (see --help)")


def parse(argv: list[str]) -> Settings:
    """Settings from the command line and the environment. ``--help`` and ``--version`` exit (0)."""
    parser = build_parser()
    given, unknown = parser.parse_known_args(argv)
    if unknown:
        raise CliError(_unrecognized(unknown, parser))
    return Settings(**vars(given))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, usage=f"{PROG} [--host HOST] [--port PORT] [options]", allow_abbrev=False,
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=34, width=100),
        description=(Settings.__doc__ or "").replace("\n    ", " "),
        epilog="Every setting, with its default and what it trades off: docs/configuration.md.",
        argument_default=argparse.SUPPRESS)  # only what is given reaches Settings: the environment fills the rest
    parser.add_argument("--version", action="version", version=f"digitserve {version('digitserve')}",
                        help="print the program's version and exit (the model version to serve is --model-version)")
    groups = {name: parser.add_argument_group(name, about) for name, about in GROUPS.items()}
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        where = groups.get(str(extra.get("group")), groups["operations"])
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            where.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=_help(field))
        else:
            where.add_argument(flag, dest=name, metavar=str(extra.get("metavar") or _metavar(name, field)),
                               help=_help(field))
    return parser


def _help(field: FieldInfo) -> str:
    default = field.default
    shown = "unset" if default is None else default.name if isinstance(default, Path) else default
    return f"{field.description} (default: {shown})".replace("%", "%%")


def _metavar(name: str, field: FieldInfo) -> str:
    """What the value looks like: a unit where the name has one, the choices of a Literal."""
    kind: Any = field.annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # e.g. int | None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is Literal:
        return "|".join(map(str, typing.get_args(kind)))
    units = {"_ms": "MS", "_s": "SECONDS", "_bytes": "BYTES"}
    for suffix, unit in units.items():
        if name.endswith(suffix):
            return unit
    if isinstance(kind, type) and issubclass(kind, SecretStr):
        return "KEY"
    if isinstance(kind, type) and issubclass(kind, Path):
        return "PATH"
    if kind in (int, float):
        return "N" if kind is int else "X"
    return name.rsplit("_", 1)[-1].upper()


def _unrecognized(unknown: list[str], parser: argparse.ArgumentParser) -> str:
    flag = next((arg.split("=", 1)[0] for arg in unknown if arg.startswith("-")), None)
    if flag is None:
        return f"unexpected argument {unknown[0]!r}: every setting is a --flag VALUE (see --help)"
    known = [option for action in parser._actions for option in action.option_strings]
    close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"unrecognized argument {flag}{hint} (see --help)"

