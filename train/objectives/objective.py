"""`Objective`: what a run minimises, the one shape every objective of train/objectives/ takes
and train/step.py differentiates."""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a run minimises, as sums over a micro-batch.

    `sums(params, frozen, reference, batch) -> (value to differentiate, sums)`:
    `sums` is a dict of float32 scalars summed over the micro-batch, with
    "weight" (what they are averaged over: weighted tokens, or preference
    pairs) and "loss". The step logs every other sum divided by the batch's
    total weight, and the weight itself as the metric named `count`.
    """

    sums: Callable
    count: str = "tokens"
