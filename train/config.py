"""Run configs: which model, which layout, which data, and how to train.

A run is a YAML file in `configs/runs/` (see `tiny_cpu.yaml`):

    model: tiny                      # name in configs/models/ or a path
    model_overrides: {remat: full}   # any ModelConfig field
    init_from: ckpt/llama3_2_1b      # start from these weights (ours, a run dir or Hugging Face)
    lora: {rank: 16, alpha: 32, targets: [wq, wk, wv, wo]}   # train adapters only
    eval: {every: 200, batches: 8}   # held-out loss (eval.paths, or data.holdout)
    eval: {every: 500, tasks: [hellaswag], task_limit: 200}   # lm-eval tasks, logged as eval/<task>/<metric>
    layout: fsdp_tp                  # name in configs/layouts/ or a path
    mesh: {tensor: 2}                # ICI size overrides for the layout
    data: {source: synthetic, seq_len: 128, global_batch: 16}   # train.data.config.DataConfig
    optimizer: {learning_rate: 3.0e-4, warmup_steps: 100}       # OptimizerConfig
    steps: 1000
    run_dir: runs/tiny
    on_nonfinite: stop               # or skip: what a NaN/inf loss or norm does (train/nonfinite.py)
    dpo: {beta: 0.1}                 # preference optimisation (train/objectives/dpo.py; data.source: preference;
                                     # data.reference_log_probs: its reference computed once, train/dpo_reference.py)
    distill: {teacher: ckpt/8b, alpha: 0.5, temperature: 2.0}   # logit distillation (train/objectives/distill.py)
    compile_cache: off               # or a directory (default: the user's cache dir; train/runtime.py)
    tpu_flags: {xla_tpu_enable_async_collective_fusion: true}   # libtpu flags (not on CPU)
    profile: {start_step: 10, steps: 3}                         # a jax.profiler trace in run_dir/profile
    checkpoint_timeout: 1200         # seconds a save may take before the run stops with an error
    local_checkpoints: {dir: /dev/shm/ckpt, every: 10}   # a fast tier on each host (train/checkpoints/local.py)
    peer_timeout: 60                 # seconds a silent process may take before the others stop (train/peers.py)
    metrics: {wandb: {project: my-project}}   # also log to Weights & Biases (train/tracking/wandb_logging.py)

Command-line overrides use dotted keys (`optimizer.learning_rate=1e-3`,
`data.global_batch=32`, `steps=10`); values are parsed as YAML. An unknown
key anywhere, or the same key given twice on the command line, is one line.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

import yaml

from llama_jax.cli import known_names
from llama_jax.config import ConfigError, ModelConfig, check_keys, load_model_config
from llama_jax.config_files import read_config_file
from sharding.topology import CHIP_PEAK_FLOPS
from train.data.config import DataConfig
from train.runtime import COMPILE_CACHE_OFF, ProfileConfig, check_tpu_flags

DECAYS = ("cosine", "linear", "constant")
# What train.compile can build for a run (serve: infer.serve's; eval: the lm-eval model's scoring pass).
PROGRAMS = ("train", "decode", "prefill", "serve", "eval")
NONFINITE_MODES = ("stop", "skip")  # what a non-finite step does: see train/nonfinite.py
WANDB_MODES = ("online", "offline", "disabled")
# `chip`: a TPU chip of sharding/topology.py's tables, or cpu (MFU against a peak measured at start-up).
CHIPS = (*CHIP_PEAK_FLOPS, "cpu")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warm-up then decay to `min_lr_ratio * learning_rate`, and clipping."""

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    decay: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0

    def __post_init__(self):
        if self.decay not in DECAYS:
            raise ConfigError(f"optimizer.decay: {self.decay!r} is not one of {', '.join(DECAYS)}")
        for name in ("learning_rate", "eps"):
            _positive(f"optimizer.{name}", getattr(self, name))
        for name in ("min_lr_ratio", "weight_decay", "b1", "b2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
                raise ConfigError(f"optimizer.{name}: must be a number in [0, 1], got {value!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps: must be a non-negative integer, got {self.warmup_steps!r}")
        if self.clip_norm is not None:
            _positive("optimizer.clip_norm", self.clip_norm)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation while training, every `every` steps (0: never): the held-out loss over
    `batches` batches of `data.global_batch` rows from `paths` (files of the training source),
    or, without paths, from the fraction `data.holdout` split off the training documents; and
    lm-eval `tasks` (names of tasks, groups or tags, train/lm_eval/; `task_limit` documents
    each, a count or a fraction below 1; `include_path` a directory of task YAMLs), each logged
    as its main metric `eval/<task>/<metric>` (docs/evaluation.md)."""

    every: int = 0
    batches: int = 8
    paths: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    task_limit: float | None = None
    include_path: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "paths", (self.paths,) if isinstance(self.paths, str) else tuple(self.paths))
        tasks = self.tasks.split(",") if isinstance(self.tasks, str) else list(self.tasks)
        object.__setattr__(self, "tasks", tuple(task.strip() if isinstance(task, str) else task for task in tasks))
        for name, least in (("every", 0), ("batches", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"eval.{name}: must be an integer >= {least}, got {value!r}")
        if any(not isinstance(task, str) or not task for task in self.tasks):
            raise ConfigError(f"eval.tasks: must be lm-eval task names (a list, or one comma-separated string), "
                              f"got {list(self.tasks)!r}")
        if self.tasks and not self.every:
            raise ConfigError("eval.tasks: set eval.every, the steps between two evaluations")
        limit = self.task_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0
                                  or (limit >= 1 and limit != int(limit))):
            raise ConfigError(f"eval.task_limit: must be a document count or a fraction below 1, got {limit!r}")
        if self.include_path is not None and (not isinstance(self.include_path, str) or not self.include_path):
            raise ConfigError(f"eval.include_path: must be a directory of task YAMLs, got {self.include_path!r}")


@dataclasses.dataclass(frozen=True)
class DpoConfig:
    """Direct preference optimisation (train/objectives/dpo.py): `beta` scales the implicit rewards;
    `reference` names the reference policy's weights (default: init_from, or the
    policy's own random start without it). A LoRA run's reference is its base,
    without adapters: `reference` must then stay unset."""

    beta: float = 0.1
    reference: str | None = None

    def __post_init__(self):
        _positive("dpo.beta", self.beta)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Logit distillation (train/objectives/distill.py): `teacher` is our checkpoint, a run directory
    or a Hugging Face directory with the student's vocabulary; the loss is
    alpha * tau^2 * KL(teacher || student) at temperature tau + (1 - alpha) * CE."""

    teacher: str | None = None
    alpha: float = 0.5
    temperature: float = 1.0

    def __post_init__(self):
        if not isinstance(self.teacher, str) or not self.teacher:
            raise ConfigError("distill.teacher: required: our checkpoint, a run directory or a Hugging Face "
                              "directory with the student's vocabulary")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ConfigError(f"distill.alpha: must be a number in [0, 1], got {self.alpha!r}")
        _positive("distill.temperature", self.temperature)


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases logging (train/tracking/wandb_logging.py): the W&B `project` (required), and
    optionally the `entity` (user or team), the run's display `name` and the `mode`
    (online, offline or disabled; unset: W&B's own, $WANDB_MODE or online)."""

    project: str | None = None
    entity: str | None = None
    name: str | None = None
    mode: str | None = None

    def __post_init__(self):
        if not isinstance(self.project, str) or not self.project:
            raise ConfigError("metrics.wandb.project: required: the W&B project to log to")
        for name in ("entity", "name"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"metrics.wandb.{name}: must be a non-empty string, got {value!r}")
        if self.mode is not None and self.mode not in WANDB_MODES:
            raise ConfigError(f"metrics.wandb.mode: {self.mode!r} is not one of {', '.join(WANDB_MODES)}")


@dataclasses.dataclass(frozen=True)
class LocalCheckpointConfig:
    """Each host's own tier (train/checkpoints/local.py): a save to `dir` every `every` steps, `keep` kept."""

    dir: str | None = None
    every: int = 10
    keep: int = 2

    def __post_init__(self):
        if not isinstance(self.dir, str) or not self.dir or "://" in self.dir:
            raise ConfigError(f"local_checkpoints.dir: must be a directory on each host, got {self.dir!r}")
        for name in ("every", "keep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"local_checkpoints.{name}: must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """Where metrics go besides metrics.jsonl and TensorBoard: `wandb` (None: nowhere else)."""

    wandb: WandbConfig | None = None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs; `model` is resolved to a ModelConfig."""

    model: ModelConfig
    data: DataConfig
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    layout: str = "fsdp"
    mesh: dict[str, int] = dataclasses.field(default_factory=dict)
    steps: int = 1000
    grad_accum: int = 1
    z_loss: float = 0.0
    loss_chunk: int = 0
    seed: int = 0
    run_dir: str = "runs/default"
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    chip: str = "cpu"
    tokenizer: str | None = None
    topology: str | None = None            # the TPU slice it is planned for (train.compile's default)
    programs: tuple[str, ...] = ("train",)  # what train.compile checks for it by default
    on_nonfinite: str = "stop"
    init_from: str | None = None
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    dpo: DpoConfig | None = None
    distill: DistillConfig | None = None
    compile_cache: str | None = None  # train/runtime.py: None = the default cache dir, "off"
    tpu_flags: dict[str, Any] = dataclasses.field(default_factory=dict)  # -> LIBTPU_INIT_ARGS
    profile: ProfileConfig | None = None
    checkpoint_timeout: int = 1200  # seconds (orbax's default): a save not done by then fails the run
    local_checkpoints: LocalCheckpointConfig | None = None  # None: the run directory's checkpoints only
    peer_timeout: int = 60  # seconds: a process silent that long ends a multi-process run (0: never)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)

    def __post_init__(self):
        for name in ("steps", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints",
                     "checkpoint_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
        if isinstance(self.peer_timeout, bool) or not isinstance(self.peer_timeout, int) or self.peer_timeout < 0:
            raise ConfigError(f"peer_timeout: must be a whole number of seconds (0: never), got {self.peer_timeout!r}")
        if isinstance(self.loss_chunk, bool) or not isinstance(self.loss_chunk, int) or self.loss_chunk < 0:
            raise ConfigError(f"loss_chunk: must be 0 (no chunking) or a positive integer, got {self.loss_chunk!r}")
        if not isinstance(self.z_loss, (int, float)) or self.z_loss < 0:
            raise ConfigError(f"z_loss: must be a non-negative number, got {self.z_loss!r}")
        if self.data.global_batch % self.grad_accum:
            raise ConfigError(f"grad_accum: {self.grad_accum} does not divide data.global_batch "
                              f"{self.data.global_batch}")
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len: {self.data.seq_len} exceeds the model's max_seq_len "
                              f"{self.model.max_seq_len}")
        if self.data.source == "synthetic" and self.data.vocab_size > self.model.vocab_size:
            raise ConfigError(f"data.vocab_size: {self.data.vocab_size} exceeds the model's vocab_size "
                              f"{self.model.vocab_size}")
        object.__setattr__(self, "programs", tuple(self.programs))
        if not self.programs or any(p not in PROGRAMS for p in self.programs):
            raise ConfigError(f"programs: {list(self.programs)!r} must name some of {', '.join(PROGRAMS)}")
        if self.topology is not None and not isinstance(self.topology, str):
            raise ConfigError(f"topology: must be a TPU slice name like v5p:4x4x4, got {self.topology!r}")
        if self.on_nonfinite not in NONFINITE_MODES:
            raise ConfigError(f"on_nonfinite: {self.on_nonfinite!r} is not one of "
                              f"{', '.join(NONFINITE_MODES)}")
        if self.model.quantize is not None and self.model.lora is None and "train" in self.programs:
            raise ConfigError(f"model.quantize {self.model.quantize}: quantised weights stay frozen; add a lora "
                              "section to train adapters over them (QLoRA), train unquantised, or leave train "
                              "out of programs to compile only the serving ones (train.compile --decode-only, "
                              "--inference or --serve)")
        if self.model.lora is not None and self.init_from is None:
            raise ConfigError("lora: a LoRA run trains adapters over fixed weights: set init_from to them")
        if self.model.vision is not None and self.model.lora is None and self.init_from is None:
            raise ConfigError("init_from: a vision run trains the image adapters over a fixed text model and "
                              "image encoder: set init_from to their weights")
        if self.dpo is not None and self.distill is not None:
            raise ConfigError("dpo, distill: a run has one objective; set one of them")
        if (self.dpo is not None) != (self.data.source == "preference"):
            raise ConfigError("dpo: preference optimisation and data.source preference go together "
                              f"(dpo is {'set' if self.dpo else 'unset'}, data.source is {self.data.source!r})")
        if self.dpo is not None and self.dpo.reference is not None and self.model.lora is not None:
            raise ConfigError("dpo.reference: a LoRA run's reference is its base without adapters; unset it")
        if self.data.reference_log_probs is not None and self.eval.paths:
            raise ConfigError("eval.paths: data.reference_log_probs holds the log-probabilities of data.paths' "
                              "pairs only; hold pairs out with data.holdout instead")
        if self.eval.every and not self.eval.tasks and not self.eval.paths and not self.data.holdout:
            raise ConfigError("eval.every: evaluation needs eval.paths, a data.holdout fraction or eval.tasks")
        if self.eval.tasks and not (self.data.tokenizer or self.tokenizer):
            raise ConfigError("eval.tasks: lm-eval's tasks are text; set tokenizer (or data.tokenizer)")
        if self.eval.tasks and self.model.vision is not None:
            raise ConfigError("eval.tasks: lm-eval's tasks evaluate text models only; unset them for a vision run")
        if self.compile_cache is False:  # YAML reads a bare `off` as false
            object.__setattr__(self, "compile_cache", COMPILE_CACHE_OFF)
        if self.compile_cache is not None and (not isinstance(self.compile_cache, str) or not self.compile_cache):
            raise ConfigError(f"compile_cache: must be a directory or \"off\", got {self.compile_cache!r}")
        check_tpu_flags(self.tpu_flags)
        if self.chip not in CHIPS:
            raise ConfigError(f"chip: {self.chip!r} is not one of {', '.join(CHIPS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(f"{name}: must be a positive finite number, got {value!r}")


def _dataclass_from(cls, data, where):
    check_keys(cls, data, f"{where}.")
    try:
        return cls(**data)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def _metrics_config(data) -> MetricsConfig:
    check_keys(MetricsConfig, data, "metrics.")
    wandb = data.get("wandb")
    return MetricsConfig(wandb=None if wandb is None else _dataclass_from(WandbConfig, wandb, "metrics.wandb"))


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["a.b=1", "steps=5"]` -> `{"a": {"b": 1}, "steps": 5}`; a key given twice is an error."""
    result: dict[str, Any] = {}
    seen = set()
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"override {arg!r}: expected key=value")
        key, raw = arg.split("=", 1)
        if key in seen:
            raise ConfigError(f"override {key}: given twice on the command line")
        seen.add(key)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}") from None
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is not a section")
        node[parts[-1]] = value
    return result


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def run_config_from_dict(data: dict[str, Any], overrides: Sequence[str] = ()) -> RunConfig:
    """Build a RunConfig from plain data (the YAML structure in this module's docstring).

    `overrides` are command-line `key=value` strings (see `parse_overrides`),
    applied on top: a nested key replaces one field of its section.
    """
    data = _merge(data, parse_overrides(list(overrides)))
    known = sorted({f.name for f in dataclasses.fields(RunConfig)} | {"model_overrides", "lora"})
    for key in data:
        if key not in known:
            raise ConfigError(f"{key}: unknown run config key {known_names(key, known, 'train/config.py')}")
    if "model" not in data:
        raise ConfigError("model: required run config key is missing")
    model = data.pop("model")
    overrides = data.pop("model_overrides", None) or {}
    if data.get("lora") is not None:  # `lora:` is the model's adapters (ModelConfig.lora)
        overrides = {**overrides, "lora": data.pop("lora")}
    data.pop("lora", None)
    if isinstance(model, ModelConfig):
        model = model.to_dict()
    if isinstance(model, dict):
        model = ModelConfig.from_dict({**model, **overrides})
    else:
        model = load_model_config(model, **overrides)
    data["model"] = model
    data["data"] = _dataclass_from(DataConfig, data.get("data", {}), "data")
    data["optimizer"] = _dataclass_from(OptimizerConfig, data.get("optimizer", {}), "optimizer")
    data["eval"] = _dataclass_from(EvalConfig, data.get("eval", {}), "eval")
    for key, cls in (("dpo", DpoConfig), ("distill", DistillConfig), ("profile", ProfileConfig),
                     ("local_checkpoints", LocalCheckpointConfig)):
        if data.get(key) is not None:
            data[key] = _dataclass_from(cls, data[key], key)
    data["metrics"] = _metrics_config(data.get("metrics") or {})
    return _dataclass_from(RunConfig, data, "run")


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a run YAML (a path or a name in configs/runs/) and apply key=value overrides."""
    _, data = read_config_file("runs", path, ConfigError)
    return run_config_from_dict(data, overrides)
