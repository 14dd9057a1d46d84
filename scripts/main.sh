#!/usr/bin/env bash
# The main job: compose the example references in assets/ with an instruction into out.png.
# With the built-in default model (models/uniref-default/, made by `python -m training.build_default`)
# (shipped in git) it also prints the ShapeCompose checker's scores for out.png. In a checkout without
# that folder a tiny random model of the same architecture is built offline (a few seconds): noise.
# Extra arguments go to the edit, e.g. `bash scripts/main.sh --seed 3`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PROMPT="$(.venv/bin/python -c 'import json; print(json.load(open("assets/example_spec.json"))["instruction"])')"
MODEL_ARGS=()
if [ ! -f models/uniref-default/model_index.json ]; then
  if [ ! -f .cache/tiny-model/model_index.json ]; then
    .venv/bin/python -m uniref_core make-tiny-model .cache/tiny-model
  fi
  MODEL_ARGS=(--model .cache/tiny-model --budget 256 --steps 20 --cfg 1)
fi
.venv/bin/python -m uniref_core edit "${MODEL_ARGS[@]}" \
  --ref assets/ref_red_circle.png --ref assets/ref_blue_triangle.png --ref assets/ref_background.png \
  --prompt "$PROMPT" --width 128 --height 128 --seed 0 -o out.png "$@"
if [ -f models/uniref-default/model_index.json ]; then
  echo "checker scores of out.png (1 = every object right; see training/tasks/shapecompose/checker.py):"
  .venv/bin/python -m training.checker out.png assets/example_spec.json
fi
