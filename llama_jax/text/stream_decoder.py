"""Generated ids to text as they arrive, for streaming (`StreamDecoder`)."""

from __future__ import annotations

from llama_jax.text.tokenizer import Tokenizer


class StreamDecoder:
    """Decode generated ids one at a time into newly completed text.

    Text that ends in an incomplete UTF-8 sequence (a character split across
    tokens) is held back until the next id completes it. Concatenating every
    `feed` result and a final `flush()` gives `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        # Decoding a window from `_start` rather than each id alone keeps
        # context-dependent decoding (SentencePiece's leading space) right.
        self._start = 0  # window start: text before it was emitted earlier
        self._done = 0  # ids up to here have been emitted

    def feed(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" if held back)."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Return whatever is held back, incomplete bytes as U+FFFD."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        seen = self._tokenizer.decode(self._ids[self._start : self._done])
        text = self._tokenizer.decode(self._ids[self._start :])
        if len(text) <= len(seen) or (text.endswith("\ufffd") and not final):
            return ""
        # Drop ids no later window needs, so a long stream stays cheap.
        del self._ids[: self._done]
        self._start, self._done = 0, len(self._ids)
        return text[len(seen) :]
