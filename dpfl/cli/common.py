"""What every dpfl subcommand shares: errors as one line, exit codes, argument types,
logging to stderr."""

from __future__ import annotations

import argparse
import difflib
import logging
import math
import sys
import time

_IMPORTED_AT = time.perf_counter()

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
EXIT_NO_ANSWER = 1  # every requested accountant refused or failed
MAX_COUNT = 10**15  # rounds, cohorts and populations beyond this are typos, not plans


class CliError(Exception):
    """Bad input: reported as one line, exit status 2."""


class Interrupted(Exception):
    """Ctrl-C: one line saying what is left, exit status 130."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise CliError(f"{self.prog}: error: {message}")

    def subcommand(self, name: str | None) -> _Parser:
        """The parser of subcommand ``name`` (this one if there is none)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and name in action.choices:
                return action.choices[name]
        return self

    def suggest(self, words: list[str]) -> str:
        """'; did you mean --x?' for mistyped flags, from this command's own flags."""
        flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        hints = []
        for word in words:
            if word.startswith("--"):
                close = difflib.get_close_matches(word.split("=", 1)[0], flags, n=3, cutoff=0.6)
                if close:
                    names = (
                        close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
                    )
                    hints.append(f"{word}: did you mean {names}?")
        return ("; " + "; ".join(hints)) if hints else f" (see {self.prog} --help)"


def _add_verbosity(p: argparse.ArgumentParser, quiet_help: str) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help=quiet_help)
    p.add_argument(
        "-v", "--verbose", action="store_true", help="also print debug messages of dpfl's modules"
    )


def _setup_logging(args: argparse.Namespace) -> None:
    """dpfl's own messages (why vectorisation fell back, resumes, budget stops) on stderr:
    INFO by default, WARNING with --quiet, DEBUG with -v. Other libraries' INFO stays off."""
    level = logging.INFO
    if getattr(args, "quiet", False):
        level = logging.WARNING
    if getattr(args, "verbose", False):
        level = logging.DEBUG
    logger = logging.getLogger("dpfl")
    logger.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname).1s dpfl: %(message)s"))
        logger.addHandler(handler)
    logger.propagate = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (it may be replaced after set-up)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _finite_float(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{name} must be finite, got {text!r}")
        return value

    return parse


def _parse_int(text: str) -> int:
    """An integer, allowing thousands separators (1,024 or 1_024)."""
    return int(text.strip().replace(",", "").replace("_", ""))


def _int_arg(name: str):
    def parse(text: str) -> int:
        try:
            value = _parse_int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if abs(value) > MAX_COUNT:
            shown = text if len(text) <= 24 else text[:20] + "..."
            raise argparse.ArgumentTypeError(f"{name} must be at most {MAX_COUNT:.0e}, got {shown}")
        return value

    return parse


def _json_safe(value):
    """inf/NaN as strings: strict JSON has no Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


