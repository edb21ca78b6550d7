#!/usr/bin/env bash
# results/steering.md: SmolLM2-135M-Instruct, (a) the sentiment positive control (a contrast set
# the project makes up: steering/sentiment.py), (b) the evaluation-awareness A/B sweep at pushes
# that reach the residual scale (vectors from its first 150 items, measured on 24 of the other 54).
#   OMP_NUM_THREADS=1 bash results/steering.sh [WORKDIR]   # ~20 min on one busy CPU core
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
W=${1:-$(mktemp -d)}
mkdir -p "$W"
MODEL=$(python -c "from llama.gguf import default_model_path as d; print(d())")

# (a) positive control: "I love X" / "I hate X" style pairs, 3 templates x 10 made-up subjects
python -m steering.sentiment "$W/sent"
python scripts/cache_activations.py --model "$MODEL" --data "$W/sent/pairs.csv" \
    --output "$W/sent/cache" --layers 6,10,14 --token mean --device cpu
python scripts/generate_vectors_from_cache.py --cache "$W/sent/cache" --output "$W/sent/vec"
SENT=$(ls -d "$W"/sent/vec_* | head -1)
python scripts/steer.py --model "$MODEL" --data "$W/sent/readout.json" --vectors "$SENT" \
    --layers 6,10,14 --multipliers=-1,-0.5,-0.25,0,0.25,0.5,1 --scale residual \
    --output results/steering_sentiment --visualize --overwrite
python scripts/generate.py --model "$MODEL" --prompts "$W/sent/open_prompts.json" \
    --steer "$SENT" --steer_layers 6,10,14 --scale residual --sweep=-0.5,0.5 --max_gen_len 16 \
    --output results/steering_sentiment/open_ended.jsonl --device cpu

# (b) evaluation awareness: contrast vectors at the answer letter, residual-scale pushes
DATA=../shared/datasets/eval_awareness/contrastive_dataset.json
python - "$DATA" "$W" <<'PY'
import json, sys
items = json.load(open(sys.argv[1]))
json.dump(items[:150], open(f"{sys.argv[2]}/train.json", "w"))
json.dump(items[150:], open(f"{sys.argv[2]}/heldout.json", "w"))
PY
python generate_dataset.py "$W/train.csv" --input "$W/train.json" --format ab --chat chatml
python scripts/cache_activations.py --model "$MODEL" --data "$W/train.csv" --output "$W/cache" \
    --layers 6,14,22 --token last --device cpu
python scripts/generate_vectors_from_cache.py --cache "$W/cache" --output "$W/ea"
RUN=$(ls -d "$W"/ea_* | head -1)
python scripts/steer.py --model "$MODEL" --data "$W/heldout.json" --vectors "$RUN" \
    --layers 6,14,22 --multipliers=-1,-0.5,0,0.5,1 --scale residual --output results/steering \
    --limit 24 --samples 2 --max_gen_len 12 --visualize --overwrite --chat chatml
