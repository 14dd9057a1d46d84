#!/usr/bin/env bash
# The main job: compose the example references with an instruction into out.png.
# Uses the built-in default model when the repository ships one; until then a tiny random model
# of the same architecture (built offline in a few seconds), whose output is noise.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
MODEL_ARGS=()
if [ ! -f models/uniref-default/model_index.json ]; then
  if [ ! -f .cache/tiny-model/model_index.json ]; then
    .venv/bin/python -m uniref_core make-tiny-model .cache/tiny-model
  fi
  MODEL_ARGS=(--model .cache/tiny-model)
fi
exec .venv/bin/python -m uniref_core edit "${MODEL_ARGS[@]}" \
  --ref assets/ref_red_circle.png --ref assets/ref_blue_square.png --ref assets/ref_background.png \
  --prompt "Put the object from Picture 1 on the left and the object from Picture 2 on the right, on the background of Picture 3" \
  --budget 512 --match-ref 3 --output-area 512 --steps 20 --seed 0 -o out.png "$@"
