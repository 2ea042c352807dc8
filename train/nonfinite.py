"""What training does when a step's loss, gradient norm or update norm is not finite.

The jitted step never applies such an update (train/step.py) and reports
which values were at fault in its "nonfinite" metric. Reading that metric
every step would make the host wait for the device, so `NonfiniteWatch`
keeps the per-step values (device scalars) and reads them only where the
loop waits anyway: at log steps and before every save. Then, by the run
config's `on_nonfinite`:

- "stop" (default): the run ends with `DivergenceError`, one line naming the
  first such step, the values at fault and the last good checkpoint. Nothing
  is saved, so no checkpoint ever holds a diverged state and
  `keep_checkpoints` never deletes the last finite one for it.
- "skip": the steps are counted (the logged `skipped_steps`), noted on the
  console, and training goes on from the last applied update.
"""

from __future__ import annotations

import jax

from train.tracking.metrics import note
from train.step import NONFINITE_BITS


class DivergenceError(Exception):
    """Training stopped at a non-finite loss, gradient norm or update norm (one-line message)."""


def faulty_values(bits: int) -> str:
    """'loss', 'loss and grad norm', 'loss, grad norm and update norm' for the NONFINITE_BITS in `bits`."""
    names = [name for name, bit in NONFINITE_BITS.items() if bits & bit]
    return " and ".join(filter(None, [", ".join(names[:-1]), names[-1]]))


class NonfiniteWatch:
    """Collects each step's "nonfinite" metric and acts on it when `check` is called."""

    def __init__(self, mode: str, learning_rate: float):
        self.mode, self.learning_rate = mode, learning_rate
        self.skipped = 0
        self._pending: list[tuple[int, jax.Array]] = []

    def add(self, step: int, nonfinite: jax.Array):
        """Remember step `step`'s metric without waiting for it."""
        self._pending.append((step, nonfinite))

    def check(self, last_checkpoint: str | None):
        """Read the metrics since the last check (waits for those steps).

        `last_checkpoint` names the last good checkpoint for the message (None:
        there is none). Raises DivergenceError in "stop" mode if any step was
        not applied; in "skip" mode counts them and says so on the console.
        """
        steps = [step for step, _ in self._pending]
        values = jax.device_get([value for _, value in self._pending])
        self._pending.clear()
        bad = [(step, int(bits)) for step, bits in zip(steps, values) if bits]
        if not bad:
            return
        first, bits = bad[0]
        what = faulty_values(bits)
        verb = "are" if " and " in what else "is"
        if self.mode == "stop":
            saved = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
                     else "no checkpoint was saved")
            raise DivergenceError(
                f"step {first}: the {what} {verb} not finite, so training stopped without applying "
                f"that update or saving; {saved}; lower optimizer.learning_rate (now "
                f"{self.learning_rate:g}) or check the data, or set on_nonfinite=skip to skip such steps")
        self.skipped += len(bad)
        note(f"step {first}: the {what} {verb} not finite; skipped {len(bad)} update(s) up to step "
             f"{bad[-1][0]} ({self.skipped} in this run)")
