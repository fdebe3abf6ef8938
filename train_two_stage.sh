#!/usr/bin/env bash
# Two-stage CompressedAD training: collect (if needed) -> pretrain encoder -> train -> evaluate.
# A thin wrapper over two_stage.py (all logic and its tests live there); same options as train_two_stage.ps1:
#   ./train_two_stage.sh experiment=quick
#   ./train_two_stage.sh --pretrain-only
#   ./train_two_stage.sh --train-only --pretrained-path runs/pretrain-encoder-darkroom-seed0/encoder-pretrained-final.pt
#   ./train_two_stage.sh --freeze-encoder --accelerate --num-processes 4 experiment=full
# Options: --pretrain-only --train-only --freeze-encoder --pretrained-path P --accelerate
#          --accelerate-config F --num-processes N --no-eval --force --dry-run, then key=value overrides.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then py="$here/.venv/bin/python"; else py="python3"; fi
fi
exec "$py" "$here/two_stage.py" "$@"
