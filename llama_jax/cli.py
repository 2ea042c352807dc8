"""What every command line here shares: bad input is one line on stderr and exit code 2.

    def main(argv=None) -> int:
        return run_cli(_main, argv, prog="prepare")
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys
from typing import Callable

# Libraries that log a traceback for each request they retry or give up on; the
# error that ends the retries reaches the command as an exception, and becomes its line.
QUIET_LOGGERS = ("gcsfs", "google.auth")


def first_line(err: BaseException) -> str:
    """An exception's first line of text (its type name if it has none), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def known_names(name: str, known, where: str) -> str:
    """The parenthesis ending an unknown-name error, short enough for one line: every known
    name (in the given order) when they fit in ~100 characters, else the closest ones to `name`
    (difflib) and `where` the rest are listed, e.g. "(closest: steps; 30 known, see train/config.py)"."""
    known = list(known)
    if len(", ".join(known)) <= 100:
        return f"(known: {', '.join(known)})"
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
    return f"({'closest: ' + ', '.join(close) + '; ' if close else ''}{len(known)} known, see {where})"


def load_function(path: str, option: str) -> Callable:
    """The function named by "module:function" (a reward, for instance); ValueError naming `option`
    (the flag or config key that gave it), one line, if it does not import."""
    module_name, _, name = path.partition(":")
    if not module_name or not name:
        raise ValueError(f"{option} {path!r}: expected module:function, e.g. my_rewards:score")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{option} {path}: cannot import module {module_name!r} ({err})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"{option} {path}: module {module_name!r} has no function {name!r}")
    return function


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None,
            prog: str | None = None) -> int:
    """Run `main(argv)`; a user-fixable error (ValueError, OSError) becomes one line on stderr,
    `<prog>: error: <first line>`, and exit code 2; Ctrl-C exits 130. Otherwise the exit code is
    what `main` returns (None: 0), e.g. 1 for an outcome that is no input error (a diverged
    run, a program that does not fit). Storage libraries' retry tracebacks stay off the
    console (QUIET_LOGGERS). Returns the exit code."""
    prefix = f"{prog}: error" if prog else "error"
    if "GCSFS_DEBUG" not in os.environ:  # gcsfs's own switch for its log
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        code = main(argv)
    except (ValueError, OSError) as err:
        print(f"{prefix}: {first_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    return code or 0
