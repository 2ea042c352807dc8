"""Why a save or a restore failed, in one short phrase (orbax and tensorstore wrap their causes deeply)."""

from __future__ import annotations

import os
import re

from llama_jax.cli import first_line


def failure_reason(err: BaseException, timeout: int) -> str:
    """Why a save failed: the operating system's words when an OS error is behind it
    ("No space left on device"), not finishing within `timeout` seconds, else the
    innermost exception's first line."""
    chain = [err]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    if isinstance(err, TimeoutError):  # orbax's, at checkpoint_timeout
        return (f"not finished within checkpoint_timeout, {timeout} s: the storage stopped answering "
                "or needs a longer timeout")
    for exc in chain:
        if isinstance(exc, OSError) and exc.errno:
            return os.strerror(exc.errno)
        code = re.search(r"os_error_code='(\d+)'", str(exc))  # tensorstore's wording
        if code:
            return os.strerror(int(code.group(1)))
    return root_cause(err)


def root_cause(err: BaseException) -> str:
    """The first line of the innermost exception (tensorstore's message, not orbax's wrapper)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return first_line(err)
