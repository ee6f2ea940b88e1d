#!/usr/bin/env bash
# GPTQ-quantize SmolLM2-135M onto llama.cpp's Q4_0 and Q8_0 grids (symmetric, groups of 32), export the GGUFs
# with the GPTQ codes written as they are, and measure perplexity with our packed model and with llama.cpp
# (llama-cpp-python, `pip install -e '.[reference]'`) on the same texts and windows.
#   [CALIB_WINDOWS=128] bash scripts/llama_cpp_quantized_perplexity.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-runs/export}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
$PY - "$OUT" <<'PYEOF'
import sys
from llmopt_jax.data.text import python_license_text, stdlib_docstrings_text
open(f"{sys.argv[1]}/docstrings.txt", "w").write(stdlib_docstrings_text())
open(f"{sys.argv[1]}/license.txt", "w").write(python_license_text())
PYEOF
for spec in "4 Q4_0" "8 Q8_0"; do
  set -- $spec
  $PY -m experiments.compress --config=configs/compress.py:gptq --config.bits="$1" --config.group_size=32 \
    --config.symmetric=True --config.act_order=True --config.save="$OUT/gptq_$2.gguf" --config.save_type="$2" \
    --config.calib.num_samples="${CALIB_WINDOWS:-128}" --config.eval.text_file="$OUT/license.txt" \
    --config.progress=False --workdir="$OUT/gptq_$2"
  for text in license docstrings; do
    # Ours on the exported file (the same weights llama.cpp reads: GPTQ's blocks, gguf-py's rounding of the
    # embedding), then llama.cpp on it; same protocol (no BOS, 512-token windows, positions 1..511 scored).
    $PY -m experiments.perplexity --config=configs/perplexity.py:smollm2 --config.model="$OUT/gptq_$2.gguf" \
      --config.eval.text_file="$OUT/$text.txt" --config.progress=False --workdir="$OUT/ours_$2_$text" > /dev/null
    OMP_WAIT_POLICY=PASSIVE $PY scripts/make_reference_fixtures.py --model "$OUT/gptq_$2.gguf" \
      --perplexity-file "$OUT/$text.txt" > "$OUT/llama_cpp_$2_$text.json"
    echo "$2 $text: ours $($PY -c "import json;print(json.load(open('$OUT/ours_$2_$text/results.json'))['perplexity'])")" \
      "llama.cpp $(cat "$OUT/llama_cpp_$2_$text.json")"
  done
done
