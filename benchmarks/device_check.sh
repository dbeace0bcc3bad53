#!/usr/bin/env bash
# The engine on an NVIDIA GPU: the tiny-model engine tests with every model on CUDA, then `safeinfer bench`
# on a random-weight copy of the default model's architecture (the weights do not change the cost of a step;
# the bench forces every configuration to generate the same number of tokens).
#
# Written for a GPU machine with python3, torch and transformers but no network and no default model, as the
# team's `device` tool lends one: the default model's config and tokenizer files travel in .dev/smollm2 and
# missing wheels (pydantic) in .whl. Results go to $OUT (default out/device). docs/benchmarks.md quotes them.
set -uo pipefail
OUT=${OUT:-out/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"

echo "== engine tests on cuda"
SAFEINFER_TEST_DEVICE=cuda SAFEINFER_TEST_NO_DEFAULT_MODEL=1 timeout "${TEST_TIMEOUT:-240}" \
    python3 -m pytest -q -p no:cacheprovider -o addopts="--import-mode=importlib" -rfE --timeout 120 \
    -k "not async" tests/test_compat.py tests/test_engine_reference.py tests/test_engine_behaviour.py \
    tests/test_gate_fit.py tests/test_building.py \
    2>&1 | tee "$OUT/tests.txt" | tail -40

[ "${SKIP_BENCH:-0}" = 1 ] && exit 0
echo "== bench on cuda"
python3 - <<'EOF'
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

config = AutoConfig.from_pretrained(".dev/smollm2")
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained("/tmp/smol-random")
AutoTokenizer.from_pretrained(".dev/smollm2").save_pretrained("/tmp/smol-random")
EOF
for dtype in ${BENCH_DTYPES:-bfloat16}; do
    timeout "${BENCH_TIMEOUT:-240}" python3 -m safeinfer_integrations.cli bench --model /tmp/smol-random \
        --device cuda --dtype "$dtype" --batch-sizes "${BENCH_BATCHES:-1,8,32}" --max-new-tokens 64 --repeats 3 \
        --prompts harmful --out "$OUT/bench_$dtype.json" 2>"$OUT/bench_$dtype.err" | tee "$OUT/bench_$dtype.txt"
done
