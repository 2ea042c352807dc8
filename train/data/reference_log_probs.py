"""DPO reference log-probabilities computed once and stored beside the preference pairs.

`python -m train.dpo_reference` (train/dpo_reference.py) writes one JSON file for
a run's preference files: for every pair, in file order, the reference model's
log-probability of its chosen and of its rejected answer (null for a pair whose
answers alone are too long for seq_len, which no run reads), and a digest of the
pair as a row holds it (token ids and loss weights, its prompt cut to fit):

    {"format": "llama-jax-dpo-reference-1", "reference": "runs/sft", "seq_len": 96,
     "pairs": 575, "chosen": [-12.5, ...], "rejected": [-14.0, ...], "digests": [3141592653, ...]}

A run with `data.reference_log_probs: FILE` reads the two sums into every row
(`REFERENCE_KEYS`, one float32 a row) instead of holding a reference model. A
file made for other pairs (files edited or reordered, another tokenizer, chat
format or seq_len) is refused before training, naming the first pair that
differs.
"""

from __future__ import annotations

import json
import zlib

import numpy as np

from llama_jax.paths import user_path

FORMAT = "llama-jax-dpo-reference-1"
REFERENCE_KEYS = ("reference_chosen", "reference_rejected")  # row keys: float32, one value a row
COMMAND = "python -m train.dpo_reference"


def pair_digest(conversations) -> int:
    """crc32 of a pair's conversations as a row holds them: each int32 [2, n] (ids, loss weights)."""
    digest = 0
    for conversation in conversations:
        digest = zlib.crc32(np.ascontiguousarray(conversation, np.int32).tobytes(), digest)
    return digest


def write_reference_log_probs(path, reference: str, seq_len: int, chosen, rejected, digests) -> None:
    """Write the file (see the module docstring); chosen, rejected: float per pair or None
    (not computed); digests: `pair_digest` per pair or None."""
    def floats(values):
        return [None if v is None else float(v) for v in values]

    text = json.dumps({"format": FORMAT, "reference": reference, "seq_len": seq_len, "pairs": len(digests),
                       "chosen": floats(chosen), "rejected": floats(rejected), "digests": list(digests)})
    user_path(path).write_text(text + "\n")


class ReferenceLogProbs:
    """A file written by `write_reference_log_probs`, read for a run's `count` pairs.

    ValueError (one line, naming the file and the fix) if it is missing, not such
    a file, or made for another number of pairs; `values(i, pair, location)`
    checks one pair against it.
    """

    def __init__(self, path, count: int):
        self.path = path
        fix = f"compute it for these pairs with {COMMAND}"
        try:
            stored = json.loads(user_path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"data.reference_log_probs {path}: no such file; {fix}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"data.reference_log_probs {path}: not a file of {COMMAND}; {fix}") from None
        if not isinstance(stored, dict) or stored.get("format") != FORMAT:
            raise ValueError(f"data.reference_log_probs {path}: not a file of {COMMAND}; {fix}")
        if stored["pairs"] != count:
            raise ValueError(f"data.reference_log_probs {path}: made for {stored['pairs']} preference pairs, "
                             f"the data holds {count}; {fix}")
        self._chosen, self._rejected, self._digests = stored["chosen"], stored["rejected"], stored["digests"]

    def values(self, i: int, pair, location: str) -> tuple[np.float32, np.float32]:
        """(chosen, rejected) reference log-probabilities of pair `i` (its conversations `pair`,
        at `location` for the message); ValueError if the file was made for another pair."""
        if self._chosen[i] is None or self._digests[i] != pair_digest(pair):
            raise ValueError(f"data.reference_log_probs {self.path}: {location} is not the pair its "
                             "log-probabilities were computed for (the pairs, tokenizer or seq_len changed); "
                             f"compute them again with {COMMAND}")
        return np.float32(self._chosen[i]), np.float32(self._rejected[i])
