"""One of two processes forming a single 8-device mesh (4 CPU devices each).

Run by tests/test_multiprocess.py as `python multiprocess_worker.py <process_id> <port>`.
Each process builds the same tiny model, feeds its rows through
`Placement.global_batch` and prints one JSON line with, per layout, the loss
and per-leaf sums of squared gradients, which the test compares against one
process with 8 devices. Under `fsdp` the batch is split over the processes,
so each feeds its own half of the rows; under `tp` every device needs every
row, so both feed the whole batch. The batch and loss are defined here so
both sides use exactly the same ones.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import numpy as np

N_PROCESSES = 2
DEVICES_PER_PROCESS = 4
BATCH, LENGTH = 8, 32
LAYOUTS = ("fsdp", "tp")


def make_batch(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The global batch: tokens and positions, int32 [BATCH, LENGTH]."""
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, vocab_size, (BATCH, LENGTH)).astype(np.int32)
    positions = np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (BATCH, LENGTH)).copy()
    return tokens, positions


def loss_fn(config, params, tokens_bt, positions_bt):
    """Mean next-token cross-entropy."""
    import jax
    import jax.numpy as jnp

    from llama_jax import Llama

    logits_btv, _ = Llama(config).apply({"params": params}, tokens_bt, positions_bt)
    logp_btv = jax.nn.log_softmax(logits_btv[:, :-1])
    return -jnp.take_along_axis(logp_btv, tokens_bt[:, 1:, None], axis=-1).mean()


def loss_and_grad_norms(placement, params, tokens, positions):
    """Loss, {leaf path: sum of squared gradient} and the global batch, under the placement."""
    import jax
    import jax.numpy as jnp

    batch = placement.global_batch({"tokens": tokens, "positions": positions})

    def step(p, t, pos):
        loss, grads = jax.value_and_grad(functools.partial(loss_fn, placement.config))(p, t, pos)
        return loss, jax.tree.map(lambda g: jnp.sum(g * g), grads)

    with placement.activate():
        loss, squares = jax.jit(step)(params, batch["tokens"], batch["positions"])
    flat = jax.tree_util.tree_leaves_with_path(squares)
    return float(loss), {jax.tree_util.keystr(path): float(v) for path, v in flat}, batch


def main(process_id: int, port: int):
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=N_PROCESSES,
                               process_id=process_id, initialization_timeout=60)
    from tiny import LLAMA3_LIKE

    from sharding.layout import load_layout
    from sharding.place import Placement

    tokens, positions = make_batch(LLAMA3_LIKE.vocab_size)
    report = {"process": process_id, "process_count": jax.process_count(),
              "global_devices": jax.device_count(), "local_devices": jax.local_device_count()}
    for name in LAYOUTS:
        placement = Placement.create(LLAMA3_LIKE, load_layout(name))
        params = placement.init_params(jax.random.key(0))  # born sharded, same values as one process
        rows = placement.process_rows(BATCH)
        mine = slice(process_id * rows, (process_id + 1) * rows) if rows < BATCH else slice(None)
        loss, grad_squares, batch = loss_and_grad_norms(placement, params, tokens[mine], positions[mine])
        # the distinct row blocks this process's devices hold, in order
        blocks = {}
        for shard in batch["tokens"].addressable_shards:
            blocks.setdefault(shard.index[0].start or 0, np.asarray(shard.data))
        held = sorted(blocks)
        report[name] = {
            "mesh": dict(placement.mesh.shape), "rows_fed": rows, "held_rows": held,
            "held_rows_are_mine": bool(np.array_equal(np.concatenate([blocks[r] for r in held]),
                                                      tokens[mine])),
            "loss": loss, "grad_squares": grad_squares}
    print(json.dumps(report), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
