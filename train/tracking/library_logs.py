"""Keep what orbax, tensorstore and asyncio print about a failure off the console.

A failed checkpoint save (a full disk, say) makes orbax log tracebacks
through absl, asyncio log futures whose errors nobody read, and tensorstore's
callbacks raise "Event loop is closed" as unraisable exceptions: hundreds of
lines that bury the one-line error training ends with. While a
`LibraryLogs` is open, all of that goes to a file in the run directory
(created only if something is written; in a gs:// run directory, written
whole when the logs close).
"""

from __future__ import annotations

import gc
import logging
import os
import sys

from llama_jax.paths import is_url, user_path

LOGGERS = ("absl", "asyncio")  # orbax and grain log through absl


class _QuietFileHandler(logging.FileHandler):
    """A file handler that drops what it cannot write (on a full disk, say) instead of
    printing the record and its traceback to stderr as logging does by default."""

    def handleError(self, record):
        pass


class _ObjectHandler(logging.Handler):
    """Keeps the records in memory and writes them to an object (gs://) when closed:
    objects cannot be appended to, and a failing bucket is often what is being logged."""

    def __init__(self, path):
        super().__init__()
        self.path, self.lines = path, []

    def emit(self, record):
        self.lines.append(self.format(record) + "\n")

    def close(self):
        if self.lines:
            try:
                self.path.write_text("".join(self.lines))
            except Exception:  # the storage that failed the run may fail this too
                pass
            self.lines = []
        super().close()


class LibraryLogs:
    """Warnings and errors of the LOGGERS, and unraisable exceptions, go to `path` until `close()`."""

    def __init__(self, path: str | os.PathLike):
        self.path = user_path(path)
        self._handler = _ObjectHandler(self.path) if is_url(path) else _QuietFileHandler(self.path, delay=True)
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
