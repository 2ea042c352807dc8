"""Running lm-eval tasks: where tasks are found, errors a user can act on, the results.

    results = evaluate(LlamaJaxLM("runs/sft"), ["llama_jax_tiny_choice"], limit=8)
    print(table(results)); write_results(results, "results.json")

Tasks are found among lm-eval's own, the offline tasks shipped in
`TASKS_DIR` (train/lm_eval/tasks/: the `llama_jax_tiny` tag) and any
`include_path` directories of task YAMLs. Without the internet, lm-eval's
own tasks need their datasets copied and a local task YAML pointing at the
copy (docs/evaluation.md); `reachable_datasets` says so in one line.

A training run with `eval.tasks` evaluates its live parameters through a
`TaskEvaluator` every `eval.every` steps and logs each task's main metric as
`eval/<task>/<metric>` (`main_metrics`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from llama_jax.config import ConfigError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
OFFLINE_REMEDY = ("offline, copy the dataset and point a local task YAML at the copy (dataset_path: json, "
                  "dataset_kwargs: {data_files: ...}), then pass its directory with --include_path "
                  "(docs/evaluation.md)")


def require_lm_eval(setting: str) -> None:
    """ConfigError (one line, naming the `eval` extra) unless lm-eval can be imported; `setting`
    names what asked for it. Only callers that were asked for tasks call it: lm-eval is optional."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"{setting}: lm-eval is not installed ({err}); pip install 'llama-jax[eval]'") from None


def include_paths(extra: str | os.PathLike | Sequence | None = None) -> list[str]:
    """The shipped tasks' directory, then `extra` (one directory or several)."""
    if extra is None:
        extra = []
    elif isinstance(extra, (str, os.PathLike)):
        extra = [extra]
    return [str(TASKS_DIR), *map(str, extra)]


def task_manager(include_path=None, metadata: dict | None = None):
    """An lm-eval TaskManager over its own tasks, ours and `include_path` (see `include_paths`)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_paths(include_path), metadata=metadata)


def check_tasks(manager, names: Sequence[str]) -> None:
    """ValueError (one line) naming the tasks (or groups, tags, patterns) that match nothing."""
    unknown = [name for name in names if not manager.match_tasks([name])]
    if unknown:
        raise ValueError(f"unknown task {', '.join(unknown)}: not one of lm-eval's tasks, groups or tags nor "
                         "a shipped llama_jax_tiny task (list them with `python -m train.lm_eval ls tasks`; "
                         "pass your own task YAMLs' directory with --include_path)")


@contextlib.contextmanager
def reachable_datasets() -> Iterator[None]:
    """Turn "this task's dataset cannot be reached" into one ValueError line with the remedy."""
    from datasets.exceptions import DatasetNotFoundError

    try:
        yield
    except (ConnectionError, DatasetNotFoundError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"a task's dataset could not be reached ({reason}); {OFFLINE_REMEDY}") from None


def evaluate(lm, tasks: Sequence[str], *, include_path=None, limit: float | None = None,
             num_fewshot: int | None = None, log_samples: bool = False, manager=None, **settings) -> dict:
    """lm-eval's results dict (`lm_eval.simple_evaluate`) for model `lm` on `tasks` (names).

    limit: documents per task (a count, or a fraction below 1). manager: a
    `task_manager` to reuse (building one reads every task YAML, seconds).
    Other `settings` go to simple_evaluate as they are (gen_kwargs, ...).
    ValueError (one line) for an unknown task or a dataset that cannot be reached.
    """
    import lm_eval

    manager = task_manager(include_path) if manager is None else manager
    check_tasks(manager, tasks)
    with reachable_datasets():
        return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                       num_fewshot=num_fewshot, log_samples=log_samples, **settings)


def evaluate_checkpoint(checkpoint, tasks: Sequence[str], *, include_path=None, limit: float | None = None,
                        num_fewshot: int | None = None, output=None, **model_args) -> dict:
    """`python -m train.eval --tasks`: check the task names, evaluate `checkpoint` (model_args
    as `LlamaJaxLM` takes them), print lm-eval's table and write the results as JSON to
    `output` (if given). Returns the results dict."""
    from train.lm_eval.model import LlamaJaxLM

    manager = task_manager(include_path)
    check_tasks(manager, tasks)  # before the model is built: a typo costs nothing
    results = evaluate(LlamaJaxLM(checkpoint, **model_args), tasks, manager=manager, limit=limit,
                       num_fewshot=num_fewshot)
    print(table(results))
    if output:
        write_results(results, output)
    return results


def table(results: dict) -> str:
    """lm-eval's markdown table of the results (and of the groups, if any)."""
    from lm_eval.utils import make_table

    return make_table(results) + ("\n" + make_table(results, "groups") if results.get("groups") else "")


def write_results(results: dict, path) -> None:
    """Write lm-eval's results dict (samples left out) as JSON to `path`."""
    from lm_eval.utils import handle_non_serializable

    from llama_jax.paths import user_path

    kept = {key: value for key, value in results.items() if key != "samples"}
    target = user_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(kept, indent=2, default=handle_non_serializable, ensure_ascii=False))


def main_metrics(results: dict, prefix: str = "eval/") -> dict[str, float]:
    """{`prefix` + "<task>/<metric>": value} of each task (and group) in lm-eval's results: its
    main metric, the first of its metric_list (under the first filter that reports it; a group,
    which has no metric_list, its first figure). Stderrs are left out."""
    figures = {}
    for task, row in results["results"].items():
        keys = [key for key in row if "," in key and "_stderr" not in key and isinstance(row[key], (int, float))]
        listed = results.get("configs", {}).get(task, {}).get("metric_list") or [{}]
        main = [key for key in keys if key.split(",")[0] == listed[0].get("metric")] or keys
        if main:
            figures[f"{prefix}{task}/{main[0].split(',')[0]}"] = float(row[main[0]])
    return figures


class TaskEvaluator:
    """A training run's lm-eval tasks (`eval.tasks`) on its live parameters, on its own placement.

    The tasks are checked when it is built (an unknown name fails before anything compiles);
    each call evaluates `params` (placed by `placement`) through the `llama-jax` model type
    (`LlamaJaxLM.from_parts`: nothing read from disk) and returns `main_metrics`. lm-eval's
    global seeds are left alone (the run's own random state is not lm-eval's to reset), and
    its bootstrapped stderrs are skipped.
    """

    def __init__(self, config, placement, tokenizer, tasks: Sequence[str], *, limit: float | None = None,
                 include_path=None, max_length: int | None = None):
        from train.lm_eval.model import LlamaJaxLM  # imports lm-eval: only runs with tasks get here

        self.tasks, self.limit = list(tasks), limit
        self.manager = task_manager(include_path)
        check_tasks(self.manager, self.tasks)
        self.lm = LlamaJaxLM.from_parts(config, placement, tokenizer, max_length=max_length)

    def __call__(self, params) -> dict[str, float]:
        self.lm.params = params
        results = evaluate(self.lm, self.tasks, manager=self.manager, limit=self.limit, bootstrap_iters=0,
                           random_seed=None, numpy_random_seed=None, torch_random_seed=None)
        self.lm.params = None  # the run's state moves on (its buffers are donated): hold no reference
        return main_metrics(results)
