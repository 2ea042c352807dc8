"""train/runtime.py: the compilation cache, profiler traces and TPU flags of a run."""

from __future__ import annotations

import re
import subprocess

import pytest

from train_runs import cli, subprocess_env

TIMEOUT = 150  # seconds for one tiny run of `python -m train` on a busy 2-core machine


def _train(run_dir, cache, *overrides) -> str:
    env = subprocess_env()
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the run config's setting, not the environment's
    env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    done = subprocess.run(cli(run_dir, "steps=3", "log_every=1", "checkpoint_every=100",
                              f"compile_cache={cache}", *overrides),
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _cache_figures(output: str, cache) -> tuple[int, int]:
    found = re.search(rf"^compile cache: (\d+) hits, (\d+) misses \({re.escape(str(cache))}\)$", output, re.M)
    assert found, output
    return int(found[1]), int(found[2])


def test_a_second_run_loads_every_compile_from_the_cache_and_a_profile_is_traced(tmp_path):
    """The first process compiles and stores (and traces step 2 into run_dir/profile); a second
    process of the same config finds every executable in the cache and compiles nothing."""
    cache = tmp_path / "cache"
    first = _train(tmp_path / "first", cache, "profile={start_step: 2, steps: 1}")
    hits, misses = _cache_figures(first, cache)
    assert hits == 0 and misses >= 1
    assert len(list(cache.iterdir())) >= misses
    traces = list((tmp_path / "first" / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0

    second = _train(tmp_path / "second", cache)
    assert _cache_figures(second, cache) == (misses, 0)
    assert not (tmp_path / "second" / "profile").exists()


def test_compile_cache_settings():
    from train.config import load_run_config
    from train.runtime import compile_cache_dir, default_compile_cache

    assert load_run_config("tiny_cpu", ["compile_cache=off"]).compile_cache == "off"  # not YAML's false
    assert load_run_config("tiny_cpu").compile_cache is None
    assert compile_cache_dir("off") is None
    assert compile_cache_dir("gs://bucket/xla") == "gs://bucket/xla"
    assert compile_cache_dir("rel/cache").endswith("/rel/cache") and compile_cache_dir("rel/cache").startswith("/")
    assert default_compile_cache({"XDG_CACHE_HOME": "/c"}) == "/c/llama-jax/jax-compile"
    assert default_compile_cache({"JAX_COMPILATION_CACHE_DIR": "/j", "XDG_CACHE_HOME": "/c"}) == "/j"
    assert compile_cache_dir(None, {"HOME": "/h"}).endswith("/.cache/llama-jax/jax-compile")


def test_tpu_flags_go_to_libtpu_init_args_but_never_on_cpu():
    from train.runtime import tpu_env

    flags = {"xla_tpu_enable_async_collective_fusion": True, "xla_tpu_enable_async_collective_fusion_fuse_all_gather":
             False, "xla_tpu_scoped_vmem_limit_kib": 98304}
    expected = ("--xla_tpu_enable_async_collective_fusion=true "
                "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=false "
                "--xla_tpu_scoped_vmem_limit_kib=98304")
    assert tpu_env(flags, {}) == {"LIBTPU_INIT_ARGS": expected}  # libtpu is installed here (the tpu extra)
    assert tpu_env(flags, {"JAX_PLATFORMS": "tpu,cpu", "LIBTPU_INIT_ARGS": "--xla_enable_async_all_gather=true"}) \
        == {"LIBTPU_INIT_ARGS": "--xla_enable_async_all_gather=true " + expected}
    assert tpu_env(flags, {"JAX_PLATFORMS": "cpu"}) == {}
    assert tpu_env({}, {}) == {}


@pytest.mark.parametrize("override, message", [
    ("tpu_flags={--xla_x: 1}", "tpu_flags: '--xla_x' is not a flag name (write xla_tpu_..., without dashes)"),
    ("tpu_flags={xla_x: [1, 2]}", "tpu_flags.xla_x: [1, 2] is not a single value"),
    ("profile={start_step: 0}", "profile.start_step: must be a positive integer, got 0"),
    ("compile_cache=''", "compile_cache: must be a directory or \"off\", got ''"),
])
def test_bad_runtime_settings_are_one_line(override, message):
    from llama_jax.config import ConfigError
    from train.config import load_run_config

    with pytest.raises(ConfigError) as caught:
        load_run_config("tiny_cpu", [override])
    assert str(caught.value) == message
