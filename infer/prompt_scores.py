"""A prompt's own log-probabilities (the completions API's `echo` with logprobs): the batcher's
third compiled program, a forward pass over prompts that leaves the decode slots alone."""

from __future__ import annotations

import numpy as np

from infer.events import Prompt, Token


def score_prompts(engine, programs, params, prefill_rows, prompts: list[list[int]]) -> tuple[dict, dict]:
    """({prompt: Prompt}, {prompt: its most likely next Token}) keyed by tuple(prompt): prompts
    scored in groups of the prefill's sizes `prefill_rows`, padded as prefill pads them (a prompt
    given several times, a request's n choices, once); `programs.score` is the slot programs'."""
    unique = list(dict.fromkeys(tuple(prompt) for prompt in prompts))
    scored, nexts, group = {}, {}, prefill_rows[-1]
    for start in range(0, len(unique), group):
        batch = unique[start:start + group]
        rows = next(r for r in prefill_rows if r >= len(batch))
        prompts_bt, _, _ = engine.pad_prompts([list(p) for p in batch], rows)
        with engine.activate():
            outputs = programs.score(params, prompts_bt)
        chosen_bt, top_ids_btk, top_lp_btk = (np.asarray(x) for x in outputs)
        for row, prompt in enumerate(batch):
            # Position i - 1 predicts token i; the first token has nothing before it.
            scored[prompt] = Prompt([Token(prompt[0], None, [], [])] + [
                Token(prompt[i], float(chosen_bt[row, i - 1]), top_ids_btk[row, i - 1].tolist(),
                      top_lp_btk[row, i - 1].tolist()) for i in range(1, len(prompt))])
            last = len(prompt) - 1
            nexts[prompt] = Token(int(top_ids_btk[row, last, 0]), float(top_lp_btk[row, last, 0]),
                                  top_ids_btk[row, last].tolist(), top_lp_btk[row, last].tolist())
    return scored, nexts
