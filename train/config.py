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
    reward: {margin: true}           # a reward model on data.source preference (train/objectives/reward.py);
                                     # the model's head becomes the score head (ModelConfig.head)
    grpo: {group: 8, reward: my_rewards:score}   # GRPO on data.source prompts (train/objectives/grpo.py,
                                     # train/rl/); or reward_model: a reward model checkpoint
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
from pathlib import Path
from typing import Any, Sequence

import yaml

from llama_jax.cli import known_names
from llama_jax.config import ConfigError, ModelConfig, check_keys, load_model_config
from llama_jax.config_files import read_config_file
from sharding.topology import CHIP_PEAK_FLOPS
from train.config_sections import (DistillConfig, DpoConfig, EvalConfig, GrpoConfig, LocalCheckpointConfig,
                                   MetricsConfig, OptimizerConfig, RewardConfig, WandbConfig)
from train.data.config import DataConfig
from train.runtime import COMPILE_CACHE_OFF, ProfileConfig, check_tpu_flags

# What train.compile can build for a run (serve: infer.serve's; eval: the lm-eval model's scoring pass).
PROGRAMS = ("train", "decode", "prefill", "serve", "eval")
NONFINITE_MODES = ("stop", "skip")  # what a non-finite step does: see train/nonfinite.py
# `chip`: a TPU chip of sharding/topology.py's tables, or cpu (MFU against a peak measured at start-up).
CHIPS = (*CHIP_PEAK_FLOPS, "cpu")


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
    reward: RewardConfig | None = None
    grpo: GrpoConfig | None = None
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
        objectives = [name for name in ("dpo", "distill", "reward", "grpo") if getattr(self, name) is not None]
        if len(objectives) > 1:
            raise ConfigError(f"{', '.join(objectives)}: a run has one objective; set one of them")
        pairs = self.dpo is not None or self.reward is not None
        if pairs != (self.data.source == "preference"):
            raise ConfigError("dpo, reward: preference pairs train DPO or a reward model, and data.source "
                              f"preference goes with one of them (data.source is {self.data.source!r}, "
                              f"{objectives[0] if objectives else 'neither'} set)")
        if (self.grpo is not None) != (self.data.source == "prompts"):
            raise ConfigError("grpo: reinforcement learning samples answers to prompts: data.source prompts goes "
                              f"with a grpo section (data.source is {self.data.source!r}, "
                              f"{'grpo' if self.grpo is not None else 'no grpo'} set)")
        if self.grpo is not None and self.eval.every:
            raise ConfigError("eval.every: a GRPO run's figures are its rewards, logged every step; unset eval")
        if self.grpo is not None and self.grpo.reference is not None and self.model.lora is not None:
            raise ConfigError("grpo.reference: a LoRA run's reference is its base without adapters; unset it")
        if self.grpo is not None and self.data.seq_len + self.grpo.max_new_tokens > self.model.max_seq_len:
            raise ConfigError(f"grpo.max_new_tokens: data.seq_len {self.data.seq_len} (the prompts) plus "
                              f"{self.grpo.max_new_tokens} exceeds the model's max_seq_len {self.model.max_seq_len}")
        if (self.reward is not None) != (self.model.head == "score"):
            raise ConfigError(f"model.head: {self.model.head!r}; the score head is trained as a reward model "
                              "(a reward section), and a reward model has the score head")
        if self.reward is not None and self.model.lora is not None:
            raise ConfigError("lora: reward models are trained in full (the score head with every weight); "
                              "unset lora")
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
    if data.get("reward") is not None:  # a reward model: the next-token head replaced by the score head
        overrides = {**overrides, "head": "score"}
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
    for key, cls in (("dpo", DpoConfig), ("distill", DistillConfig), ("reward", RewardConfig), ("grpo", GrpoConfig),
                     ("profile", ProfileConfig),
                     ("local_checkpoints", LocalCheckpointConfig)):
        if data.get(key) is not None:
            data[key] = _dataclass_from(cls, data[key], key)
    data["metrics"] = _metrics_config(data.get("metrics") or {})
    return _dataclass_from(RunConfig, data, "run")


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a run YAML (a path or a name in configs/runs/) and apply key=value overrides."""
    _, data = read_config_file("runs", path, ConfigError)
    return run_config_from_dict(data, overrides)
