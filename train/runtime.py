"""The habits of a pod job around the training loop: a persistent compilation
cache, TPU compiler flags, and profiler traces.

- `compile_cache` (run config): JAX's persistent compilation cache directory.
  Unset, it is `$JAX_COMPILATION_CACHE_DIR` if that is set, else
  `<user cache dir>/llama-jax/jax-compile` (`$XDG_CACHE_HOME` or `~/.cache`);
  `off` disables it. A second run of the same config loads its executables
  from there instead of compiling them (`CacheCounter` counts the hits).
- `tpu_flags` (run config): libtpu compiler flags, e.g.
  `{xla_tpu_enable_async_collective_fusion: true}`, passed to libtpu through
  `LIBTPU_INIT_ARGS`, which it reads once, when JAX first starts its TPU
  backend: they are applied before that, and never on a CPU-only run.
- `profile: {start_step, steps}` (run config): a `jax.profiler` trace of
  steps start_step .. start_step + steps - 1 in `<run_dir>/profile`, for
  TensorBoard's profile plugin or XProf. For a gs:// run directory the trace
  is written to a local temporary directory, copied to the bucket when it
  stops and deleted: the profiler's own Cloud Storage writer has a fixed
  endpoint and credentials of its own, and one path layer (llama_jax/paths.py)
  reaches buckets here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import tempfile

from llama_jax.config import ConfigError
from llama_jax.paths import copy_tree, is_url, user_path

COMPILE_CACHE_OFF = "off"
PROFILE_DIR = "profile"


def default_compile_cache(environ=os.environ) -> str:
    """Where the compilation cache goes when the run config does not say."""
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return environ["JAX_COMPILATION_CACHE_DIR"]
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "llama-jax", "jax-compile")


def compile_cache_dir(setting: str | None, environ=os.environ) -> str | None:
    """The cache directory for a run's `compile_cache` setting (None: the cache is off)."""
    if setting == COMPILE_CACHE_OFF:
        return None
    if setting is None:
        return default_compile_cache(environ)
    return setting if is_url(setting) else str(user_path(setting))


def enable_compile_cache(setting: str | None) -> str | None:
    """Point JAX's persistent compilation cache at the run's directory; the directory, or None.

    Must run before the first compile of the process (JAX opens the cache then)."""
    import jax

    directory = compile_cache_dir(setting)
    jax.config.update("jax_enable_compilation_cache", directory is not None)
    if directory is not None:
        jax.config.update("jax_compilation_cache_dir", directory)
    return directory


class CacheCounter:
    """Counts JAX's persistent-cache hits and misses from now on (its monitoring events)."""

    HIT, MISS = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"

    def __init__(self):
        import jax

        self.hits = self.misses = 0
        jax.monitoring.register_event_listener(self._on_event)

    def _on_event(self, event: str, **_):
        if event == self.HIT:
            self.hits += 1
        elif event == self.MISS:
            self.misses += 1


def tpu_env(flags: dict, environ=os.environ) -> dict[str, str]:
    """The environment variables to set so libtpu compiles with `flags` ({} on CPU).

    LIBTPU_INIT_ARGS keeps what the environment already holds (a user's
    flags come first; a run config's flag of the same name wins, being later).
    A run is on CPU when JAX_PLATFORMS names no tpu, or libtpu is not installed.
    """
    if not flags:
        return {}
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms and "tpu" not in platforms.split(","):
        return {}
    if importlib.util.find_spec("libtpu") is None:
        return {}
    ours = " ".join(f"--{name}={_flag_value(value)}" for name, value in flags.items())
    return {"LIBTPU_INIT_ARGS": " ".join(filter(None, [environ.get("LIBTPU_INIT_ARGS", ""), ours]))}


def _flag_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def check_tpu_flags(flags) -> None:
    """ConfigError (one line) unless `flags` maps flag names to scalars."""
    if not isinstance(flags, dict):
        raise ConfigError(f"tpu_flags: must be a mapping of libtpu flag names to values, got {flags!r}")
    for name, value in flags.items():
        if not isinstance(name, str) or not name or name.startswith("-") or " " in name:
            raise ConfigError(f"tpu_flags: {name!r} is not a flag name (write xla_tpu_..., without dashes)")
        if not isinstance(value, (bool, int, float, str)) or " " in str(value):
            raise ConfigError(f"tpu_flags.{name}: {value!r} is not a single value")


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """Trace `steps` training steps from `start_step` (1-based, as logged) into <run_dir>/profile."""

    start_step: int = 1
    steps: int = 3

    def __post_init__(self):
        for name in ("start_step", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"profile.{name}: must be a positive integer, got {value!r}")


class StepProfiler:
    """Starts a jax.profiler trace before step `start_step` and stops it after the last
    traced step (or at `close`); only process 0 traces."""

    def __init__(self, config: ProfileConfig | None, run_dir, active: bool):
        self.config = config if active else None
        self.directory = user_path(run_dir) / PROFILE_DIR
        self._tracing = False
        self._local: str | None = None  # gs:// run_dir: where the trace is written until it stops

    def wrap(self, step_fn, start: int):
        """`step_fn(state, batch)` tracing the configured steps; the first call is step start + 1."""
        if self.config is None:
            return step_fn
        step = start

        def traced(state, batch):
            nonlocal step
            step += 1
            self.before(step)
            result = step_fn(state, batch)
            self.after(step, result)
            return result

        return traced

    def before(self, step: int):
        """Call before running `step` (1-based)."""
        if self.config is not None and step == self.config.start_step and not self._tracing:
            import jax
            if is_url(self.directory):
                self._local = tempfile.mkdtemp(prefix="llama-jax-profile-")
            jax.profiler.start_trace(self._local or str(self.directory))
            self._tracing = True

    def after(self, step: int, result=None):
        """Call after `step` ran; `result` (arrays) is waited for before the trace stops."""
        if self._tracing and step >= self.config.start_step + self.config.steps - 1:
            self.close(result)

    def close(self, result=None):
        if self._tracing:
            import jax
            if result is not None:
                jax.block_until_ready(result)
            jax.profiler.stop_trace()
            self._tracing = False
            if self._local is not None:
                try:
                    copy_tree(self._local, self.directory)
                finally:
                    shutil.rmtree(self._local)
                    self._local = None
