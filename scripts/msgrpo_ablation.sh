#!/usr/bin/env bash
# The MSGRPO aggregation ablation of training/README.md ("MSGRPO on the default model"): from the shipped
# SFT model (models/uniref-default-sft, the default before MSGRPO), one run per aggregation on the same
# prompts, seed and step budget (training/configs/msgrpo_ablation.json, an override of msgrpo_base.json), each
# exported and evaluated on the held-out test split.
#   bash scripts/msgrpo_ablation.sh                 # the start model, then min, normalized_sum, sum
#   bash scripts/msgrpo_ablation.sh min sum         # only these arms
# Work files: runs/rl-data (prompts), runs/rl/<arm> (run, resumable), runs/rl/model-<arm>,
# runs/rl/<arm>-eval*-seed<S>.json, and prints the table (scripts/msgrpo_table.py). 2 processes × 1 thread;
# ~30 min an arm on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=.venv/bin/python
ARMS=("$@")
[ ${#ARMS[@]} -gt 0 ] || ARMS=(start min normalized_sum sum)
EVAL=(--refs 2-3 --n 24 --grid '')
if [ ! -f runs/rl-data/train/manifest.jsonl ]; then
  $PY -m training.make_shapecompose --out runs/rl-data --train 400 --val 8 --ks 2 3 3 \
    --compose-fraction 1 --order anchored --ref-side 96
fi
mkdir -p runs/rl
for arm in "${ARMS[@]}"; do
  if [ "$arm" = start ]; then
    model=models/uniref-default-sft
  else
    cfg=runs/rl/$arm.json
    $PY - "$arm" "$cfg" <<'PYEOF'
import json, sys
from training.common.config import read_config_data
arm, path = sys.argv[1], sys.argv[2]
cfg = read_config_data("training/configs/msgrpo_ablation.json")  # its base merged in: the copy stands alone
cfg.update(aggregation=arm, output_dir=f"runs/rl/{arm}")
json.dump(cfg, open(path, "w"), indent=1)
PYEOF
    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 -m training.msgrpo --config "$cfg" --resume auto
    last=$(ls -d runs/rl/$arm/checkpoints/step_* | sort | tail -1)
    model=runs/rl/model-$arm
    [ -f "$model/model_index.json" ] || $PY -m training.export --checkpoint "$last" --out "$model"
  fi
  for seed in 0 1; do  # the K that were trained, at two sampling seeds (the noise)
    out=runs/rl/$arm-eval-seed$seed.json
    [ -f "$out" ] || { $PY -m training.evaluate --model "$model" --seed $seed "${EVAL[@]}" > "$out.tmp" && mv "$out.tmp" "$out"; }
  done
  out=runs/rl/$arm-eval-k4-6-seed0.json  # the untrained K, one seed (~5 min)
  [ -f "$out" ] || { $PY -m training.evaluate --model "$model" --seed 0 --refs 4-6 --n 24 --grid '' > "$out.tmp" && mv "$out.tmp" "$out"; }
done
$PY scripts/msgrpo_table.py runs/rl
