"""The ``plmetric`` entry point: :func:`build_parser` asks each command module to add its sub-parser,
and :func:`main` parses the command line and runs the command, turning known errors into one line
on stderr and an exit status (:mod:`plmetric.cli.errors`)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from plmetric.cli.commands import (
    demo,
    duplicates,
    embed,
    export,
    groups,
    index,
    neighbours,
    search,
    serve,
    similarity_study,
    train,
)
from plmetric.cli.commands import eval as evaluate
from plmetric.cli.common import HelpFormatter, OneLineArgumentParser
from plmetric.cli.errors import error_line, known_errors
from plmetric.core.names import shown

COMMANDS = (
    evaluate,
    train,
    embed,
    index,
    search,
    neighbours,
    duplicates,
    groups,
    export,
    serve,
    demo,
    similarity_study,
)  # in --help order


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with all subcommands."""
    from plmetric import __version__

    parser = OneLineArgumentParser(
        prog="plmetric",
        description="Unsupervised deep metric learning with piecewise-linear manifolds.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"plmetric {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    """Warnings as one line naming what happened (not the library line that warned); control
    characters of the names in it escaped (:func:`plmetric.core.names.shown`)."""
    return f"plmetric: warning: {shown(str(message))}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``plmetric`` console script.

    Exit status: 0 done; 2 bad input (one line on stderr naming the file or option and what was
    expected, no traceback, nothing existing overwritten); 1 an internal error (one line; run with
    ``--debug`` or ``PLMETRIC_DEBUG=1`` for the traceback); 130 interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # usage errors (2) and --help/--version (0), also when called in-process
        return int(done.code or 0)
    debug = args.debug or bool(os.environ.get("PLMETRIC_DEBUG"))
    if not debug:
        warnings.formatwarning = one_line_warning  # DataLoader workers forked later inherit it
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("plmetric: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        if isinstance(err, known_errors()):
            print(f"plmetric: error: {error_line(err)}", file=sys.stderr)
            return 2
        print(
            f"plmetric: internal error: {type(err).__name__}: {error_line(err)} "
            "(rerun with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1
