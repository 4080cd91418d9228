#!/usr/bin/env bash
# One call on the GPU machine: versions, per-token parity, then the throughput table.
#   bash bench/run_gpu.sh OUT_DIR [throughput.py case names...]
# Data and tokenizer come from .carry/ (huanhuan.json, qwen2/), carried with the call.
set -o pipefail
out=${1:?output directory}; shift
export PYTHONUNBUFFERED=1 PYTHONPATH=src TOKENIZERS_PARALLELISM=false
# wheels the GPU image lacks (liger-kernel), carried in .carry/wheels/
if ls .carry/wheels/*.whl >/dev/null 2>&1; then
    python -m pip install -q --no-deps --target /tmp/tunelab-wheels .carry/wheels/*.whl 2>&1 | grep -v WARNING
    export PYTHONPATH=src:/tmp/tunelab-wheels
fi
python - <<'PY' 2>&1 | tee "$out/versions.txt"
import inspect, torch, transformers, peft
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory / 2**30, "GiB")
try:
    from torch.nn.attention.varlen import varlen_attn
    print("varlen_attn", inspect.signature(varlen_attn))
except ImportError as err:
    print("no varlen_attn:", err)
PY
python bench/gqa_check.py --json "$out/gqa.json" > "$out/gqa.log" 2>&1 || tail -5 "$out/gqa.log"
python bench/learning_parity.py tokens --tokenizer .carry/qwen2 --data .carry/huanhuan.json \
    --shape qwen2-1.5b --json "$out/tokens.json" > "$out/tokens.log" 2>&1
python - "$out/tokens.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for k, v in r.items():
    print(k, v)
PY
python bench/throughput.py --data .carry/huanhuan.json --tokenizer .carry/qwen2 --json "$out/throughput.json" \
    ${@:+--cases "$@"} 2>&1 | grep -v -i "warn" | tee "$out/throughput.log"
