"""What both checkpoint tiers do alike around orbax's asynchronous saves."""

from __future__ import annotations

from llama_jax.formats.checkpoint import CheckpointError


class AsyncSaves:
    """A tier whose orbax `manager` saves in the background, one save (`saving`: its step) at a
    time. Subclasses give `_save_error(step, err)`, the one line a failed save ends the run with."""

    manager = None
    saving: int | None = None

    def wait(self):
        """Wait for the save in progress; CheckpointError if it failed."""
        step, self.saving = self.saving, None
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            raise self._save_error(step, err) from None
        self._saved(step)

    def close(self):
        """Wait for the save in progress (CheckpointError if it failed), then release orbax's manager."""
        try:
            if self.saving is not None:
                self.wait()
        finally:
            self.manager.close()

    def _saved(self, step: int) -> None:
        """Called once the save of `step` is complete."""

    def _save_error(self, step: int, err: BaseException) -> CheckpointError:
        raise NotImplementedError
