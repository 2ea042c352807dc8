"""Keep what orbax, tensorstore and asyncio print about a failure off the console.

A failed checkpoint save (a full disk, say) makes orbax log tracebacks
through absl, asyncio log futures whose errors nobody read, and tensorstore's
callbacks raise "Event loop is closed" as unraisable exceptions: hundreds of
lines that bury the one-line error training ends with. While a
`LibraryLogs` is open, all of that goes to a file in the run directory
(created only if something is written).
"""

from __future__ import annotations

import gc
import logging
import sys
from pathlib import Path

LOGGERS = ("absl", "asyncio")  # orbax and grain log through absl


class _QuietFileHandler(logging.FileHandler):
    """A file handler that drops what it cannot write (on a full disk, say) instead of
    printing the record and its traceback to stderr as logging does by default."""

    def handleError(self, record):
        pass


class LibraryLogs:
    """Warnings and errors of the LOGGERS, and unraisable exceptions, go to `path` until `close()`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._handler = _QuietFileHandler(self.path, delay=True)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        self._loggers = [logging.getLogger(name) for name in LOGGERS]
        self._saved = [(logger.level, logger.propagate) for logger in self._loggers]
        for logger in self._loggers:
            logger.addHandler(self._handler)
            logger.setLevel(logging.WARNING)
            logger.propagate = False
        self._unraisablehook, sys.unraisablehook = sys.unraisablehook, self._unraisable

    def _unraisable(self, unraisable):
        logging.getLogger(LOGGERS[0]).warning(
            "%s: %r", unraisable.err_msg or "Exception ignored in", unraisable.object,
            exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))

    def close(self):
        """Collect abandoned futures (they log when collected) into the file, then restore."""
        gc.collect()
        sys.unraisablehook = self._unraisablehook
        for logger, (level, propagate) in zip(self._loggers, self._saved):
            logger.removeHandler(self._handler)
            logger.setLevel(level)
            logger.propagate = propagate
        self._handler.close()
