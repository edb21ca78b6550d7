#!/usr/bin/env bash
# results/capability.md: what steering SmolLM2-135M-Instruct along the sentiment direction (the
# positive control of results/steering.sh) costs on the local lm-eval task set, measured through
# the server as any client would (lm-eval local-completions, steered aliases by name).
#   bash results/capability.sh [WORKDIR]   # needs lm-eval: make setup-lmeval
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
W=${1:-$(mktemp -d)}
mkdir -p "$W"
MODEL=$(python -c "from llama.gguf import default_model_path as d; print(d())")

python -m steering.sentiment "$W/sent"
python scripts/cache_activations.py --model "$MODEL" --data "$W/sent/pairs.csv" \
    --output "$W/sent/cache" --layers 10 --token mean --device cpu
python scripts/generate_vectors_from_cache.py --cache "$W/sent/cache" --output "$W/sent/vec"
SENT=$(ls -d "$W"/sent/vec_* | head -1)
python bench/bench_capability.py --vectors "sentiment=$SENT" \
    --alias sent+0.25=sentiment:10:0.25:residual --alias sent-0.25=sentiment:10:-0.25:residual \
    --alias sent+0.5=sentiment:10:0.5:residual --output results/capability.md
