#!/usr/bin/env bash
# The README's steering curve: SmolLM2-135M-Instruct, contrast vectors from the first 150 items of
# the evaluation-awareness contrast set, steering measured on the other 54 (held out).
#   OMP_NUM_THREADS=1 bash results/steering.sh [WORKDIR]   # ~10 min on one busy CPU core
# Vectors: mean over pairs of (true side - false side) at the last token, the answer letter.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-$(mktemp -d)}
mkdir -p "$W"
DATA=../shared/datasets/eval_awareness/contrastive_dataset.json
MODEL=$(python -c "from llama.gguf import default_model_path as d; print(d())")
python - "$DATA" "$W" <<'PY'
import json, sys
items = json.load(open(sys.argv[1]))
json.dump(items[:150], open(f"{sys.argv[2]}/train.json", "w"))
json.dump(items[150:], open(f"{sys.argv[2]}/heldout.json", "w"))
PY
python generate_dataset.py "$W/train.csv" --input "$W/train.json" --format ab --chat chatml
python scripts/cache_activations.py --model "$MODEL" --data "$W/train.csv" --output "$W/cache" \
    --layers 6,10,14,18,22 --token last --device cpu
python scripts/generate_vectors_from_cache.py --cache "$W/cache" --output "$W/ea"
RUN=$(ls -d "$W"/ea_* | head -1)
python scripts/steer.py --model "$MODEL" --data "$W/heldout.json" --vectors "$RUN" \
    --layers 6,10,14,18,22 --multipliers=-8,-4,-2,0,2,4,8 --output results/steering \
    --samples 3 --max_gen_len 12 --visualize --overwrite --chat chatml
python scripts/steer.py --model "$MODEL" --data "$W/heldout.json" --vectors "$RUN" \
    --layers 6,10,14,18,22 --ablate --output results/steering_ablate --overwrite --chat chatml
