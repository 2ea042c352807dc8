"""The facts of Llama 4's tokenizer: its pre-tokenizer pattern and its 2048 special tokens.

Read from Meta's reference (llama_models/llama4/tokenizer.py): the BPE ranks
are a tiktoken file of 200,000 tokens (o200k-sized; Llama 3's has 128,000),
split by the o200k pattern below (letter case classes, contractions glued
to the word, up to three digits), and 2048 special tokens follow the ranks:
five basic ones, 75 of post-training (chat headers, end of turn / message,
tool-call tags, padding), 1054 for images, 10 for reasoning, then
`<|reserved_special_token_N|>` for the rest. Ids are ranks + index here, so
`<|begin_of_text|>` is 200000 and `<|eot|>` 200008.
"""

from __future__ import annotations

RANKS = 200_000  # regular tokens in Meta's Llama 4 tokenizer.model
SPECIAL_COUNT = 2048

PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])

STOPS = ("<|end_of_text|>", "<|eom|>", "<|eot|>")
PAD = "<|finetune_right_pad|>"


def _numbered(name: str, first: int, count: int) -> list[str]:
    return [f"<|{name}_reserved_special_token_{i}|>" for i in range(first, first + count)]


def special_tokens() -> list[str]:
    """The 2048 special-token names in id order (ids start at the number of ranks)."""
    basic = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    post_train = (["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]
                  + _numbered("text_post_train", 0, 6)
                  + ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"]
                  + _numbered("text_post_train", 8, 61))
    vision = (["<|image_start|>", "<|image_end|>"] + _numbered("vision", 0, 2)
              + ["<|tile_x_separator|>", "<|tile_y_separator|>"] + _numbered("vision", 2, 4)
              + ["<|image|>"] + _numbered("vision", 6, 1) + ["<|patch|>"] + _numbered("vision", 7, 1041))
    reasoning = _numbered("reasoning", 0, 8) + ["<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    named = basic + post_train + vision + reasoning
    return named + [f"<|reserved_special_token_{i}|>" for i in range(SPECIAL_COUNT - len(named))]
