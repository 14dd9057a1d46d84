#!/usr/bin/env bash
# The main job: the built-in default model composes the example references with an instruction into
# out.png, and the ShapeCompose checker says how right it is (each reference's object, the instruction).
# Extra arguments go to the edit, e.g. `bash scripts/main.sh --seed 3`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PROMPT="$(.venv/bin/python -c 'import json; print(json.load(open("assets/example_spec.json"))["instruction"])')"
# The prompt (also in assets/example_spec.json): Put the object from Picture 1 on the left and the object from Picture 2 on the right, on the background of Picture 3.
.venv/bin/python -m uniref_core edit \
  --ref assets/ref_red_circle.png --ref assets/ref_blue_square.png --ref assets/ref_background.png \
  --prompt "$PROMPT" --width 128 --height 128 --seed 0 -o out.png "$@"
echo "checker scores of out.png (1 = every object right; see training/checker.py):"
.venv/bin/python -m training.checker out.png assets/example_spec.json
