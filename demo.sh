#!/usr/bin/env bash
# The README demo, start to finish on a fresh machine (about 10 minutes on 2 cores):
# set up, train a tokenizer and a small Llama-3-style model on Python's standard
# library under fsdp_tp on 8 emulated CPU devices, then generate from it.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q -e .
PY=.venv/bin/python
export XLA_FLAGS="--xla_force_host_platform_device_count=8" JAX_PLATFORMS=cpu

# Python's own standard library: on every machine that has Python (PSF licence).
STDLIB=$($PY -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
SOURCES=("$STDLIB"/*.py "$STDLIB"/{asyncio,collections,concurrent/futures,email,encodings,html,http,importlib,json,logging,multiprocessing,sqlite3,tomllib,unittest,urllib,xml/dom,xml/etree,zoneinfo}/*.py)

mkdir -p runs/demo
if [ ! -f runs/demo/tokenizer.model ]; then
  $PY -m train.tokenizer --input "${SOURCES[@]}" --vocab-size 4096 --output runs/demo/tokenizer.model
fi
if [ ! -d runs/demo/data ]; then
  $PY -m train.prepare --tokenizer runs/demo/tokenizer.model --input "${SOURCES[@]}" --output runs/demo/data
fi
# Resumes from runs/demo/checkpoints if a previous run was interrupted.
$PY -m train --config configs/runs/demo_stdlib.yaml "$@"
$PY -m infer --checkpoint runs/demo/checkpoints --tokenizer runs/demo/tokenizer.model \
  --prompt "def " --max-new-tokens 120 --temperature 0.8 --top-p 0.95 --seed 0
