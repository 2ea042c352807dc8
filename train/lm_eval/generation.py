"""Generation for lm-eval's `generate_until`: the decoding programs jitted on a layout's mesh.

    generator = Generator(model, placement, rows=16, max_length=2048)
    outputs = generator(params, prompts, max_new_tokens=256, sampling=Sampling(), stop_ids={2},
                        finished=lambda row, tokens: ...)   # generated ids per prompt

The same pure functions inference compiles (llama_jax/decoding/programs.py:
`prefill`, then `decode` in chunks of steps), without infer/'s engine: train/
never imports infer/. Prompts are sorted by length (longest first), cut into
batches of `rows`, right-padded as inference pads them (decoding.buckets.prompt_shape),
and rows advance at their own positions. After each chunk of steps the host
asks `finished(row, tokens)` (lm-eval's `until` strings are text, which only
the host can see); the batch ends when every row has a stop id, its
`max_new_tokens`, or is finished, so a short answer does not pay for
`max_gen_toks` steps.

Letters in names: b rows, t prompt positions, n decode steps.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax.arith import round_up
from llama_jax.decoding import programs
from llama_jax.decoding.programs import NO_TOKEN
from llama_jax.decoding.buckets import cache_bucket, pad_rows, prompt_shape
from llama_jax.decoding.sampling import Sampling
from llama_jax.model.llama import Llama
from sharding.place import Placement

DECODE_CHUNK = 32  # decode steps between two looks at the text (one compiled loop serves all)


class Generator:
    """Generate from token-id prompts with one model on one placement.

    rows: rows per batch, rounded up to divide over the layout's batch axes.
    max_length: the most positions a row may reach (prompt plus new tokens).
    """

    def __init__(self, model: Llama, placement: Placement, rows: int, max_length: int,
                 decode_chunk: int = DECODE_CHUNK):
        self.placement = placement
        self.rows = round_up(rows, placement.shards_along("batch"))
        self.max_length = max_length
        self.decode_chunk = decode_chunk
        self.replicated = NamedSharding(placement.mesh, PartitionSpec())
        options = programs.loop_compiler_options(model.config, placement.mesh.devices.flat[0].platform)
        self._prefill, self._decode = programs.jit_programs(
            model, placement.tree_shardings(programs.state_axes(model.config)), self.replicated, options)

    def __call__(self, params, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling,
                 stop_ids: Collection[int], finished: Callable[[int, list[int]], bool] | None = None,
                 seed: int = 0) -> list[list[int]]:
        """The ids generated for each prompt, in order, ending before the first stop id.

        Every prompt plus `max_new_tokens` must fit in max_length (ValueError
        otherwise). `finished(i, ids)`: whether prompt i's ids so far (no
        stop id among them) are enough; None: never. `params` placed on this
        generator's placement.
        """
        for i, prompt in enumerate(prompts):
            if not prompt or len(prompt) + max_new_tokens > self.max_length:
                raise ValueError(f"prompt {i} of {len(prompt)} tokens plus {max_new_tokens} new tokens "
                                 f"does not fit max_length {self.max_length}")
        finished = finished or (lambda i, ids: False)
        stops = set(stop_ids)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        outputs: list[list[int]] = [[] for _ in prompts]
        for start in range(0, len(order), self.rows):
            batch = order[start:start + self.rows]
            for i, ids in zip(batch, self._batch(params, [prompts[i] for i in batch], max_new_tokens,
                                                 sampling, stops, lambda row, ids: finished(batch[row], ids),
                                                 seed)):
                outputs[i] = ids
        return outputs

    def _batch(self, params, prompts, max_new_tokens, sampling, stops, finished, seed):
        """Generate for up to `rows` prompts, longest first: prefill, then chunks of decode steps."""
        plan, n = self.placement, len(prompts)
        t, chunk = prompt_shape(len(prompts[0]), self.max_length, plan.shards_along("length"),
                                programs.PREFILL_CHUNK)
        prompts_bt, lengths_b = pad_rows(prompts, self.rows, t)  # padding rows: nothing generated
        limits_b = np.zeros((self.rows,), np.int32)
        limits_b[:n] = max_new_tokens
        stops_k = plan.put(np.asarray(sorted(stops) or [NO_TOKEN], np.int32), self.replicated)
        inputs = (plan.put(prompts_bt, plan.sharding("batch", "length")), plan.put(lengths_b, plan.sharding("batch")),
                  plan.put(limits_b, plan.sharding("batch")), plan.put(np.asarray(seed, np.int32), self.replicated),
                  stops_k)
        with plan.activate():
            state, first_b, _ = self._prefill(params, *inputs, sampling=sampling, chunk=chunk,
                                              cache_len=max(t, cache_bucket(len(prompts[0]) + max_new_tokens)))
        ids = [[int(token)] for token in np.asarray(first_b)[:n]]
        done = [self._done(row, ids[row], max_new_tokens, stops, finished) for row in range(n)]
        steps = min(self.decode_chunk, max_new_tokens - 1) if max_new_tokens > 1 else 0
        while not all(done):
            with plan.activate():
                state, out_bn, _ = self._decode(params, state, stops_k, sampling=sampling, steps=steps)
            for row, out_n in enumerate(np.asarray(out_bn)[:n]):
                if not done[row]:
                    ids[row] += [int(token) for token in out_n if token != NO_TOKEN]
                    done[row] = self._done(row, ids[row], max_new_tokens, stops, finished)
        return [_before_stop(row_ids, stops) for row_ids in ids]

    @staticmethod
    def _done(row, ids, max_new_tokens, stops, finished) -> bool:
        return len(ids) >= max_new_tokens or any(i in stops for i in ids) or finished(row, _before_stop(ids, stops))


def _before_stop(ids: list[int], stops: Collection[int]) -> list[int]:
    """`ids` up to (not including) the first stop id."""
    for k, token in enumerate(ids):
        if token in stops:
            return ids[:k]
    return ids
