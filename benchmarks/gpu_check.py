"""What only a GPU can check: the pipeline with the Triton kernels compiled for it, against the CPU path.

    python benchmarks/gpu_check.py pipeline                 # tiny random Llama: GPU answers vs CPU answers
    python benchmarks/gpu_check.py real --tokens 32000,128000 --out results/gpu_real.json   # bundled model

`pipeline`: the tiny random Llama of the tests (float32), once on the CPU (PyTorch path) and once moved to
the GPU (Triton kernels), under the settings of tests/test_encode.py (KV budget or none, calibration,
suffix scoring, chat and plain templates) and four questions each; the GPU must give the same tokens, the
same kept chunks and KV positions, and chunk NLLs within 1e-4 (the float32 kernels use IEEE dots, not
tf32). Also on the GPU: an encoded document answers as a fresh run does, and `generate_batch` as one run
per document. Exits 1 on any difference.

`real`: the bundled SmolLM2-135M-Instruct on the GPU in its default precision, with the CLI's defaults
(natural questions, no instruction): a passkey and a NIAH document per length, depth 0.37, reporting the
answer, whether it holds the needle, time to the answer, prefill and decode time and peak GPU memory (the
median of --repeats runs after one untimed warm-up, which compiles the kernels). Then a follow-up question
over an encoding of the longest passkey document. Writes JSON (--out).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the tiny model and byte tokenizer of the tests


def _differences(res, want) -> str:
    """'' where `res` is the answer `want` by tests/test_encode.py's assert_same (NLLs within 1e-4), else why not."""
    from test_encode import assert_same

    try:
        assert_same(res, want, exact_nll=False)
    except AssertionError as e:
        return " ".join(str(e).split())[:300] or f"differs from {want.text!r}"  # bare asserts carry no message
    return ""


def check_pipeline() -> int:
    from _tiny_pipeline import tiny_pc
    from test_encode import CONFIGS, DOC, QUESTIONS, document

    from parallelcomp_triton import ParallelComp

    cpu = tiny_pc()
    model = copy.deepcopy(cpu.model).cuda()
    model.backend = "auto"  # Triton on CUDA tensors
    gpu = ParallelComp(model, cpu.tokenizer, "tiny (cuda)")
    failures, cases = 0, 0
    for name, cfg in CONFIGS.items():
        with gpu.encode(DOC, cfg) as encoded:
            for question in QUESTIONS:
                want = cpu.generate(DOC, question, config=cfg)
                got = gpu.generate(DOC, question, config=cfg)
                from_encoding = gpu.generate(encoded, question, config=cfg)
                for label, res in (("gpu", got), ("gpu encoded", from_encoding)):
                    cases += 1
                    diffs = _differences(res, want)
                    failures += bool(diffs)
                    print(f"{'FAIL' if diffs else 'ok  '} {name:20s} {label:12s} {question!r}: {res.text!r}"
                          + (f"  <- {diffs}" if diffs else ""), flush=True)
    docs = [document(200 + 40 * i, seed=i) for i in range(3)]
    cfg = CONFIGS["budget_chat_k2_b3"]
    batch = gpu.generate_batch([(doc, "Which word comes first?") for doc in docs], config=cfg)
    for i, doc in enumerate(docs):
        cases += 1
        diffs = _differences(batch[i], cpu.generate(doc, "Which word comes first?", config=cfg))
        failures += bool(diffs)
        print(f"{'FAIL' if diffs else 'ok  '} generate_batch doc {i}: {batch[i].text!r}"
              + (f"  <- {diffs}" if diffs else ""))
    print(f"pipeline on {torch.cuda.get_device_name()}: {cases - failures}/{cases} cases equal the CPU path")
    return 1 if failures else 0


def _timed(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return result, statistics.median(times), times


def check_real(lengths, repeats, out) -> int:
    from parallelcomp_triton import ParallelComp
    from parallelcomp_triton.tasks import niah_case, passkey_case

    t = time.perf_counter()
    pc = ParallelComp.from_pretrained(device="cuda")
    load_s = time.perf_counter() - t
    print(f"bundled model on {torch.cuda.get_device_name()} in {pc.model.embed_tokens.weight.dtype} "
          f"({pc.dtype_source}), loaded in {load_s:.1f} s", flush=True)
    rows = []
    for tokens in lengths:
        for task in ("passkey", "niah"):
            case = (passkey_case if task == "passkey" else niah_case)(pc.tokenizer, tokens, 0.37, seed=0,
                                                                      question="natural")
            question = case.question
            pc.generate(case.context, question)  # warm-up: kernel compilation, allocator
            torch.cuda.reset_peak_memory_stats()
            res, median_s, times = _timed(lambda: pc.generate(case.context, question), repeats)
            st = res.stats
            row = {"task": task, "tokens": tokens, "document_tokens": st["document_tokens"], "depth": 0.37,
                   "question": question, "answer": res.text, "expected": case.answer,
                   "found": case.answer in res.text, "seconds_median": round(median_s, 3),
                   "seconds_all": [round(x, 3) for x in times],
                   "prefill_seconds": round(st["time_prefill_s"], 3),
                   "decode_ms_per_token": round(st["decode_ms_per_token"], 2),
                   "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                   "kept_chunks": st["kept_chunks"], "chunks": len(st["chunk_spans"]), "dtype": st.get("dtype")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    longest = max(lengths)
    case = passkey_case(pc.tokenizer, longest, 0.37, seed=0, question="natural")
    t = time.perf_counter()
    encoded = pc.encode(case.context)
    torch.cuda.synchronize()
    encode_s = time.perf_counter() - t
    question = case.question
    fresh, fresh_s, _ = _timed(lambda: pc.generate(case.context, question), repeats)
    follow, follow_s, _ = _timed(lambda: pc.generate(encoded, question), repeats)
    followup = {"tokens": longest, "encode_seconds": round(encode_s, 3), "fresh_seconds": round(fresh_s, 3),
                "followup_seconds": round(follow_s, 3), "speedup": round(fresh_s / follow_s, 2),
                "same_answer": follow.token_ids == fresh.token_ids, "answer": follow.text}
    encoded.close()
    print(json.dumps({"followup": followup}), flush=True)

    print(f"\n| task | tokens | found | answer | s (median of {repeats}) | prefill s | decode ms/token | "
          "peak GiB |\n|---|---:|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['task']} | {r['document_tokens']} | {'yes' if r['found'] else 'no'} | {r['answer'][:40]!r} | "
              f"{r['seconds_median']} | {r['prefill_seconds']} | {r['decode_ms_per_token']} | "
              f"{r['peak_gpu_memory_gib']} |")
    print(f"follow-up at {longest}: encode {encode_s:.2f} s, fresh {fresh_s:.3f} s, follow-up {follow_s:.3f} s "
          f"({fresh_s / follow_s:.1f}x), same answer: {followup['same_answer']}")
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "python": platform.python_version(),
           "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_seconds": round(load_s, 2)}
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump({"environment": env, "results": rows, "followup": followup}, f, indent=1)
        print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("section", choices=["pipeline", "real"])
    p.add_argument("--tokens", default="32000,128000", help="real: document lengths")
    p.add_argument("--repeats", type=int, default=3, help="real: timed runs per case (median)")
    p.add_argument("--out", default=None, help="real: JSON results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device: this script checks the GPU path", file=sys.stderr)
        return 2
    with torch.inference_mode():
        if args.section == "pipeline":
            return check_pipeline()
        return check_real([int(x) for x in args.tokens.split(",")], args.repeats, args.out)


if __name__ == "__main__":
    sys.exit(main())
