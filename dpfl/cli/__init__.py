"""The ``dpfl`` command.

Subcommands: ``simulate`` (train in process), ``central`` (a speech seed model), ``speech-corpus``
(synthesise a corpus offline), ``report`` (statement and plots of runs), ``audit`` (empirical
privacy audit), ``budget`` (epsilon of a plan, noise for a target, extrapolation), ``new`` (a
Flower app project for your own model and data).

Errors in the input end the command with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dpfl.cli.budget import _add_budget
from dpfl.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CliError,
    Interrupted,
    _Parser,
    _setup_logging,
)
from dpfl.cli.new import _add_new
from dpfl.cli.run import (  # noqa: F401 (_checkpoint_line, _config_from_args: for tests)
    _add_central,
    _add_corpus,
    _add_simulate,
    _checkpoint_line,
    _config_from_args,
    _task_options,
)
from dpfl.cli.tools import _add_audit, _add_report


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dpfl", description=__doc__.splitlines()[0])
    from importlib.metadata import version

    parser.add_argument("--version", action="version", version=f"dpfl {version('dpfl')}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_budget(sub)
    _add_simulate(sub)
    _add_central(sub)
    _add_corpus(sub)
    _add_report(sub)
    _add_audit(sub)
    _add_new(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if hasattr(args, "config") and unknown:
            args.task_options, unknown = _task_options(unknown)
        if unknown:
            sub = parser.subcommand(getattr(args, "command", None))
            sub.error(f"unrecognized arguments: {' '.join(unknown)}{sub.suggest(unknown)}")
        _setup_logging(args)
        return args.func(args)
    except (Interrupted, KeyboardInterrupt) as err:
        print(str(err) or "interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CliError as err:
        message = " ".join(str(err).split()) or "invalid input"
        if not message.startswith("dpfl"):
            message = f"dpfl: error: {message}"
        print(message, file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
