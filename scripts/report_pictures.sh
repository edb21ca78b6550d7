#!/usr/bin/env bash
# The README's report pictures from a real run: SmolLM2-135M-Instruct on 160 built-in cities
# statements ("The city of X is in Y.", true or false), a logistic-regression probe per layer
# (ccs.py train on mean states), its report with per-token heat-maps from a token "all" cache,
# then screenshots in headless Chromium -> docs/report.png, docs/report_tokens.png.
# (tests/test_report.py takes the same screenshots of its tiny runs.) About 2 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${PICTURES_DIR:-data/pictures}
MODEL=data/models/smollm2-135m
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -f "$MODEL/params.json" ] || $PY -m llama.convert \
  "$($PY -c 'from llama.gguf import default_model_path; print(default_model_path())')" "$MODEL" --mp 1
$PY generate_dataset.py "$OUT/cities.csv" --format cities --mode statement --limit 160 --seed 0 \
  --tokenizer_path "$MODEL/tokenizer.model"
for token in all mean; do
  $PY scripts/cache_activations.py --model "$MODEL" --data "$OUT/cities.csv" \
    --output "$OUT/cache_$token" --layers 4,8,12,16,20 --token $token --device cpu
done
$PY ccs.py train --cache "$OUT/cache_mean" --output "$OUT/run" --methods lr,mean_diff \
  --html_report false
$PY scripts/report.py "$OUT/run" --tokens "$OUT/cache_all" \
  --direction "$OUT/run/probes/lr.safetensors" --examples 6 --layer 12 --output "$OUT/report.html" \
  --title "Report: SmolLM2-135M-Instruct, 160 cities statements"
$PY - "$OUT/report.html" <<'PYEOF'
import os, sys
sys.path.insert(0, "tests")
from browser import Browser, console_errors
with Browser() as driver:
    driver.get("file://" + os.path.abspath(sys.argv[1]))
    assert console_errors(driver) == [], console_errors(driver)
    os.makedirs("docs", exist_ok=True)
    driver.save_screenshot("docs/report.png")
    driver.find_element("css selector", ".heatmap").screenshot("docs/report_tokens.png")
print("wrote docs/report.png, docs/report_tokens.png")
PYEOF
