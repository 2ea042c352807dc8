"""How often a distilled student's greedy next token agrees with its teacher's, against the
same student trained on the same text with cross-entropy alone (JSON lines).

    XLA_FLAGS=--xla_force_host_platform_device_count=1 python bench/distill_agreement.py [--steps 150]

The teacher is a random two-layer tiny model whose output projection is scaled up, so its
predictions are far from uniform; the training text is sampled from it (temperature 1),
so cross-entropy on that text also learns the teacher, from one sampled token a position
instead of the whole distribution. Held-out prompts are 16-token prefixes of other
samples; agreement is the share whose greedy next token is the teacher's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from infer.generate import generate  # noqa: E402
from llama_jax import Llama, ModelConfig, init_params  # noqa: E402
from llama_jax.checkpoint import save_params  # noqa: E402
from llama_jax.weights import load_params  # noqa: E402
from train.config import run_config_from_dict  # noqa: E402
from train.loop import train  # noqa: E402
from train.sources import INDEX_FILE, META_FILE, TOKENS_FILE, TOKENS_FORMAT  # noqa: E402

TEACHER = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256,
                      rope_theta=10000.0, max_seq_len=64)
STUDENT = TEACHER.replace(ffn_dim=64)  # as deep as the teacher, half its FFN width


def sample_rows(params, count: int, length: int, seed: int) -> np.ndarray:
    """int32 [count, length]: a random first token, then the teacher's samples."""
    firsts = np.random.default_rng(seed).integers(0, TEACHER.vocab_size, count)
    outputs = generate(params, None, [[int(t)] for t in firsts], max_new_tokens=length - 1, temperature=1.0,
                       seed=seed, config=TEACHER, stop_ids=())
    return np.asarray([[int(t)] + out.tokens for t, out in zip(firsts, outputs)], np.int32)


def write_tokens(directory: Path, rows: np.ndarray):
    """A token directory (train.prepare's format) with one document a row."""
    directory.mkdir()
    rows.astype(np.uint16).tofile(directory / TOKENS_FILE)
    np.save(directory / INDEX_FILE, np.arange(len(rows) + 1, dtype=np.int64) * rows.shape[1])
    (directory / META_FILE).write_text(json.dumps({
        "format": TOKENS_FORMAT, "dtype": "uint16", "vocab_size": TEACHER.vocab_size, "bos_id": 0, "eos_id": 0,
        "num_docs": len(rows), "num_tokens": int(rows.size)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rows", type=int, default=512)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="distill_agreement_"))
    teacher = init_params(TEACHER, jax.random.key(7))
    teacher["output"]["kernel"] = teacher["output"]["kernel"] * 30.0
    save_params(root / "teacher", TEACHER, teacher)
    write_tokens(root / "text", sample_rows(teacher, args.rows, 64, seed=1))
    prompts = sample_rows(teacher, 256, 16, seed=2)

    def greedy(config, params):
        logits = jax.jit(Llama(config).apply)({"params": params}, prompts,
                                              np.broadcast_to(np.arange(16), prompts.shape))[0]
        return np.asarray(logits[:, -1].argmax(-1))

    target = greedy(TEACHER, teacher)
    for name, extra in (("distill", {"distill": {"teacher": str(root / "teacher"), "alpha": 0.5,
                                                 "temperature": 1.0}}),
                        ("cross_entropy", {})):
        run = run_config_from_dict({
            "model": STUDENT.to_dict(), "layout": "dp", "mesh": {"data": 1}, "steps": args.steps,
            "data": {"source": "tokens", "paths": [str(root / "text")], "seq_len": 63, "global_batch": 16},
            "optimizer": {"learning_rate": 3e-3, "warmup_steps": 10, "weight_decay": 0.0}, "loss_chunk": 16,
            "log_every": args.steps, "checkpoint_every": args.steps, "run_dir": str(root / name), **extra})
        train(run, progress=False)
        agreement = float(np.mean(greedy(STUDENT, load_params(root / name, STUDENT)) == target))
        print(json.dumps({"bench": "distill_agreement", "objective": name, "steps": args.steps,
                          "held_out_prompts": len(prompts), "agreement_with_teacher_greedy": agreement}),
              flush=True)


if __name__ == "__main__":
    main()
