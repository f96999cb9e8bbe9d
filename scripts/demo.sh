#!/usr/bin/env bash
# The main job: install, then fine-tune a small transformer with AdaLoRA (python -m adalora_fast.demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m adalora_fast.demo "$@"
