"""lm-eval `custom_dataset` for the tasks in this folder: their JSONL files, read from here.

A task YAML names its files relative to this folder, so the shipped tasks
work from an installed wheel and from any working directory:

    custom_dataset: !function local_json.load
    dataset_kwargs:
      data_files: {test: tiny_facts.jsonl}

(lm-eval's usual `dataset_path: json` resolves relative `data_files` against
the working directory instead; docs/evaluation.md shows that form, with
absolute paths, for a local copy of a real task.)
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(data_files: dict, **_metadata):
    """A datasets.DatasetDict: split name -> the rows of that JSONL file (one JSON object
    a line). lm-eval also passes the task's metadata; it is not needed here."""
    import datasets

    splits = {}
    for split, name in data_files.items():
        lines = (HERE / name).read_text(encoding="utf-8").splitlines()
        splits[split] = datasets.Dataset.from_list([json.loads(line) for line in lines if line.strip()])
    return datasets.DatasetDict(splits)
