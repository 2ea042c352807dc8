"""Rows of fine-tuning data: whole chat or completion examples packed into rows, and
preference pairs (a chosen and a rejected conversation per row), as random access.

`train/data/pipeline.py`'s pipeline shards, shuffles and batches them.
"""

from __future__ import annotations

import logging

import numpy as np

from llama_jax.arith import ceil_div
from train.data.config import DataConfig
from train.data.reference_log_probs import REFERENCE_KEYS, ReferenceLogProbs


def example_row(examples: list[np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """One row of whole examples laid end to end, each its own segment.

    examples: int32 [2, n] each (ids, 0/1 loss weights), n - 1 <= seq_len in
    total over the row. Example k gives inputs ids[:-1], targets ids[1:],
    loss weights weights[1:] (the weight of the token predicted), positions
    0.. and segment id k + 1; the rest is padding (weight 0, segment 0).
    """
    row = {key: np.zeros(seq_len, np.int32) for key in ("tokens", "targets", "positions", "segment_ids")}
    row["loss_weights"] = np.zeros(seq_len, np.float32)
    at = 0
    for k, (ids, weights) in enumerate(examples):
        n = len(ids) - 1
        row["tokens"][at:at + n], row["targets"][at:at + n] = ids[:-1], ids[1:]
        row["loss_weights"][at:at + n] = weights[1:]
        row["positions"][at:at + n] = np.arange(n)
        row["segment_ids"][at:at + n] = k + 1
        at += n
    return row


class ExampleRows:
    """Rows of whole fine-tuning examples as random access (examples never straddle rows).

    Each kept example's length is read once up front (one pass that encodes
    every example of this split); over-long ones are dropped or truncated as
    `config.overlong` says. In `order`, examples fill a row until the next
    one would not fit (with packing), or one example per row.
    """

    def __init__(self, examples, indices: np.ndarray, config: DataConfig):
        self._examples, self._seq_len = examples, config.seq_len
        if examples.vision is not None and config.packing:
            raise ValueError("data.packing: a vision model's rows hold one example each (images belong "
                             "to a row); set data.packing to false")
        kept, lengths, overlong = [], [], 0
        for i in indices:
            ids, weights = examples[int(i)]
            n = len(ids) - 1
            if n > config.seq_len:
                overlong += 1
                if config.overlong == "drop" or not weights[1:config.seq_len + 1].any():
                    continue
                n = config.seq_len
            if n >= 1 and weights[1:n + 1].any():
                kept.append(int(i))
                lengths.append(n)
        if overlong:
            what = "dropped" if config.overlong == "drop" else "truncated to it (dropped if no answer is left)"
            logging.getLogger(__name__).warning(
                "data: %d of %d examples are longer than seq_len %d; %s", overlong, len(indices),
                config.seq_len, what)
        if not kept:
            raise ValueError(f"{', '.join(config.paths)}: no example with an answer fits seq_len {config.seq_len}")
        self._kept = np.asarray(kept, np.int64)
        starts, used = [0], 0
        for j, n in enumerate(lengths):
            if j and (not config.packing or used + n > config.seq_len):
                starts.append(j)
                used = 0
            used += n
        self._starts = np.asarray(starts + [len(kept)], np.int64)

    def __len__(self) -> int:
        return len(self._starts) - 1

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        picked = self._kept[self._starts[r]:self._starts[r + 1]]
        row = example_row([self._examples[int(i)][:, :self._seq_len + 1] for i in picked], self._seq_len)
        vision = self._examples.vision
        if vision is not None:  # one example per row (no packing)
            row["images"] = self._examples.images(int(picked[0]), row["tokens"])
            # <|image|> is never predicted (weight 0, user turns only) and lies past the
            # output vocabulary: as a target it is padding, an id the loss can index.
            row["targets"][row["targets"] == vision.image_token_id] = 0
        return row


def fit_pair(pair, seq_len: int):
    """A preference pair cut to fit one row of `seq_len`, or None if its answers alone do not.

    pair: (chosen, rejected) conversations, each int32 [2, n] (ids, loss weights
    weighting the final answer only); a row holds n - 1 inputs of each. A pair
    too long for that loses the same number of ids from the start of both
    conversations (their shared prompt, oldest first), as few as make it fit,
    keeping at least one prompt id before each answer (the answers' first ids are
    targets): both answers stay whole and follow the same, latest context.
    """
    excess = sum(conversation.shape[1] - 1 for conversation in pair) - seq_len
    if excess <= 0:
        return pair
    cut = ceil_div(excess, 2)
    prompt = min(int(np.flatnonzero(conversation[1])[0]) for conversation in pair)
    if cut >= prompt:
        return None
    return tuple(conversation[:, cut:] for conversation in pair)


MARGIN_KEY = "margin"  # a reward model's pair rows: each pair's margin (Preferences.margin), float32


def whole(conversation: np.ndarray) -> np.ndarray:
    """A conversation ([2, n]: ids, weights) with one padding id appended, so that `example_row`
    lays all n ids out as inputs: a reward model reads its score at the last one."""
    return np.concatenate([conversation, np.zeros((2, 1), conversation.dtype)], axis=1)


class PairRows:
    """Rows of preference pairs as random access: row r holds pair `pairs[r]`'s chosen
    conversation (segment 1) then its rejected one (segment 2), see `example_row`,
    cut to fit by `fit_pair`: a pair too long for seq_len loses the start of its
    prompt; one whose answers alone do not fit is dropped (both counted in a log
    line): a truncated answer's reward would compare nothing.

    With `reward`, each conversation is laid out whole (`whole`: its final id an input too,
    where DPO's rows hold it only as a target) and each row holds the pair's margin
    (MARGIN_KEY, float32).

    With `config.reference_log_probs` (train/data/reference_log_probs.py), each row also
    holds the reference's log-probability of its two answers (REFERENCE_KEYS), and the
    file is checked against every kept pair up front.
    """

    def __init__(self, pairs, indices: np.ndarray, config: DataConfig, reward: bool = False):
        self._pairs, self._seq_len, self._reward = pairs, config.seq_len, reward
        stored = None
        if config.reference_log_probs is not None:
            stored = ReferenceLogProbs(config.reference_log_probs, len(pairs))
        self.pairs, self._reference = [], {}  # the kept pairs' indices; their reference log-probs
        cut = 0
        for i in map(int, indices):
            given = self._conversations(i)
            pair = fit_pair(given, config.seq_len)
            if pair is None:
                continue
            self.pairs.append(i)
            cut += pair is not given
            if stored is not None:
                self._reference[i] = stored.values(i, pair, pairs.location(i))
        dropped = len(indices) - len(self.pairs)
        if cut or dropped:
            logging.getLogger(__name__).warning(
                "data: %d of %d preference pairs do not fit seq_len %d with both answers: %d with the start "
                "of their prompt cut, %d dropped (their answers alone do not fit)",
                cut + dropped, len(indices), config.seq_len, cut, dropped)
        if not self.pairs:
            raise ValueError(f"{', '.join(config.paths)}: no preference pair's answers fit seq_len {config.seq_len}")

    def __len__(self) -> int:
        return len(self.pairs)

    def _conversations(self, i: int):
        pair = self._pairs[i]
        return tuple(map(whole, pair)) if self._reward else pair

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        i = self.pairs[r]
        row = example_row(list(fit_pair(self._conversations(i), self._seq_len)), self._seq_len)
        if self._reference:
            row.update(zip(REFERENCE_KEYS, self._reference[i]))
        if self._reward:
            row[MARGIN_KEY] = np.float32(self._pairs.margin(i))
        return row


PROMPT_KEYS = ("tokens", "lengths", "index")  # a prompts batch: ids [B, seq_len], lengths [B], line index [B]


class PromptRows:
    """Prompts one a row, as random access (train/data/sources.py `Prompts`): row r is prompt
    `indices[r]`, its ids right-padded with 0 to seq_len ("tokens"), its length ("lengths") and
    its index in the prompts files ("index", which the reward reads its conversation by).
    ValueError (one line) for a prompt longer than seq_len."""

    def __init__(self, prompts, indices: np.ndarray, config: DataConfig):
        self._prompts, self._indices, self._seq_len = prompts, indices, config.seq_len

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        i = int(self._indices[r])
        ids = self._prompts[i]
        if len(ids) > self._seq_len:
            raise ValueError(f"{self._prompts.location(i)}: a prompt of {len(ids)} tokens, more than data.seq_len "
                             f"{self._seq_len}; raise data.seq_len")
        tokens = np.zeros(self._seq_len, np.int32)
        tokens[:len(ids)] = ids
        return {"tokens": tokens, "lengths": np.int32(len(ids)), "index": np.int32(i)}
