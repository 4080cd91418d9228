#!/usr/bin/env bash
# Data-parallel scaling on one host (not run yet: no multi-GPU machine was lent when it was written).
#   bash bench/scaling.sh OUT_DIR [GPU counts, default: 1 2 4]
# Data and tokenizer come from .carry/ (huanhuan.json, qwen2/), as for bench/run_gpu.sh.
set -eo pipefail
out=${1:?output directory}; shift
counts=${*:-1 2 4}
export PYTHONUNBUFFERED=1 PYTHONPATH=src TOKENIZERS_PARALLELISM=false
mkdir -p "$out"
for shape in qwen2-1.5b qwen2-7b; do
    extra=""
    [ "$shape" = qwen2-7b ] && extra="--micro-batch-tokens 4096"
    for n in $counts; do
        torchrun --standalone --nproc_per_node "$n" bench/scaling.py --data .carry/huanhuan.json \
            --tokenizer .carry/qwen2 --shape "$shape" --steps 30 --warmup 5 $extra \
            --json "$out/scaling_${shape}_${n}gpu.json" > "$out/scaling_${shape}_${n}gpu.log" 2>&1 \
            || tail -20 "$out/scaling_${shape}_${n}gpu.log"
    done
done
# held-out loss spread across seeds on one GPU, to judge "equal within seed spread"
for seed in 1 2; do
    torchrun --standalone --nproc_per_node 1 bench/scaling.py --data .carry/huanhuan.json --tokenizer .carry/qwen2 \
        --shape qwen2-1.5b --steps 30 --warmup 5 --seed "$seed" --json "$out/seed_${seed}.json" \
        > "$out/seed_${seed}.log" 2>&1 || tail -20 "$out/seed_${seed}.log"
done
python bench/scaling.py --table "$out"/scaling_*.json | tee "$out/scaling.md"
