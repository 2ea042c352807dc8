"""lm-eval (EleutherAI's LM Evaluation Harness) on our checkpoints: the `llama-jax` model type.

    python -m train.lm_eval --model llama-jax --model_args checkpoint=DIR,layout=fsdp,dtype=bfloat16 \\
        --tasks arc_easy --limit 100 --output_path results/
    python -m train.eval --checkpoint DIR --tasks hellaswag,arc_easy --limit 100 --output results.json

    import lm_eval
    from train.lm_eval import LlamaJaxLM
    results = lm_eval.simple_evaluate(model=LlamaJaxLM("runs/sft", layout="fsdp"), tasks=["arc_easy"])

  model       LlamaJaxLM: text and requests (importing it registers `llama-jax`)
  scoring     log-likelihoods in padded, bucketed batches on the mesh
  generation  greedy (or sampled) generation with the decoding programs
  run         task look-up (lm-eval's, ours in tasks/, --include_path), errors, results, and
              `TaskEvaluator`: a training run's `eval.tasks` on its live parameters
  tasks/      tiny offline tasks (tag llama_jax_tiny): multiple choice, rolling, generation

lm-eval is an optional dependency (`pip install llama-jax[eval]`): only
`model` imports it, and this package imports `model` when `LlamaJaxLM` is
first asked for, so `scoring` (train.compile's evaluation program) and a run
without tasks never need it.
"""

from train.lm_eval.run import TASKS_DIR, evaluate

__all__ = ["LlamaJaxLM", "TASKS_DIR", "evaluate"]


def __getattr__(name: str):
    if name == "LlamaJaxLM":  # imports lm-eval: only when asked for
        from train.lm_eval.model import LlamaJaxLM

        return LlamaJaxLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
