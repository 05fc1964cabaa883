#!/usr/bin/env bash
# Gemma 3 270M, SAAP 20 % of the decoder, --shape uniform: prune, eval (WikiText-2, 128 windows), llama.cpp's own
# converter -> f16 GGUF, then that GGUF's WikiText-2 and generations through llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
W=artifacts/gemma-uniform; mkdir -p $W
S=.venv/bin/saap
/usr/bin/time -f "prune wall %e s, peak %M KB" $S prune --model gemma3-270m --ratio 0.2 --ratio-of decoder --shape uniform --narrow-queries --num-samples 32 --out $W/u20 --quiet --overwrite
python3 -c "import json;c=json.load(open('$W/u20/config.json'));print({k:c.get(k) for k in ('architectures','num_hidden_layers','num_attention_heads','num_key_value_heads','intermediate_size','head_dim')})"
$S eval --model $W/u20 --ppl wikitext2 --ppl-windows 128 --out $W/u20-eval.json --quiet
CONV=.venv/share/llama.cpp
PYTHONPATH=$CONV/gguf-py .venv/bin/python $CONV/convert_hf_to_gguf.py $W/u20 --outfile $W/u20-f16.gguf --outtype f16 > $W/convert.log 2>&1
echo converted: $(ls -la $W/u20-f16.gguf)
$S eval --engine gguf --model $W/u20-f16.gguf --threads 2 --ppl wikitext2 --ppl-windows 128 --generate --out $W/u20-gguf-eval.json --quiet
echo DONE
