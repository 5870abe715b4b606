"""Replay retrieval cases under other KV-eviction pooling rules, at the chunks each run kept.

    python benchmarks/pool_replay.py benchmarks/results/acc_niah_128k.json --variants sym7,sym11,trail7

KV eviction keeps, per chunk, layer and KV head, the B keys whose max-pooled window score is highest.
Variants of the pooling window around key j:
  symN     max over [j - N//2, j + N//2]   (select_kv's pool_kernel = N; sym7 is SnapKV's)
  trailN   max over [j - N + 1, j]         (a key is kept with the N - 1 keys after it)
  asym-A+B max over [j - A, j + B]
The trail and asym windows are applied to the scores before select_kv (pool_kernel = 1): an experiment,
not a package option. Chunk eviction ranks chunks before any KV is dropped, so a case is replayed by
encoding only its run's kept chunks (`ParallelComp.generate_from_chunks`, which reproduces a run exactly).
Prints one line per case and variant and a summary; writes JSON after every point; never asserts timings.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time


def window(variant: str) -> tuple[int, int]:
    """Keys before and after j that the pooled score of key j looks at."""
    if m := re.fullmatch(r"sym(\d+)", variant):
        n = int(m.group(1))
        return n // 2, n // 2
    if m := re.fullmatch(r"trail(\d+)", variant):
        return int(m.group(1)) - 1, 0
    if m := re.fullmatch(r"asym-(\d+)\+(\d+)", variant):
        return int(m.group(1)), int(m.group(2))
    raise SystemExit(f"error: unknown variant {variant!r} (symN, trailN, asym-A+B)")


def pooled(scores, cu, before: int, after: int):
    """Max of each sequence's scores [N, H] over [j - before, j + after], clipped to the sequence."""
    import torch

    out = torch.empty_like(scores)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        x = torch.nn.functional.pad(scores[a:b].T.unsqueeze(1), (before, after), value=float("-inf"))
        out[a:b] = torch.nn.functional.max_pool1d(x, before + after + 1, stride=1).squeeze(1).T
    return out


def main() -> int:
    import parallelcomp_triton.score as score  # select_kv is called from score.score_chunks
    from budget_replay import RUN_SETTINGS, ChunkingChanged, run_cases
    from parallelcomp_triton import ParallelComp

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", help="JSON written by `python -m parallelcomp_triton.eval --json`")
    p.add_argument("--variants", default="sym7,sym11")
    p.add_argument("--out", default="results/pool_replay.json")
    args = p.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    windows = {v: window(v) for v in variants}
    select_kv, current = score.select_kv, {}

    def select(scores, cu, budget, pool_kernel=7, **kw):
        before, after = current["window"]
        if before == after:
            return select_kv(scores, cu, budget, pool_kernel=2 * before + 1, **kw)
        return select_kv(pooled(scores, cu, before, after), cu, budget, pool_kernel=1, **kw)

    score.select_kv = select
    pc = ParallelComp.from_pretrained(None)
    rows = []
    try:
        # The run's settings and B; the pooling is the variant's.
        for _, result, case_row, case, cfg in run_cases(pc, args.results, RUN_SETTINGS + ("kv_budget",)):
            for v in variants:
                current["window"] = windows[v]
                t = time.perf_counter()
                res = pc.generate_from_chunks(case.context, case.question, case_row["kept_chunks"], config=cfg)
                row = {"task": result["task"], "question": result.get("question", "cue"),
                       "tokens": case_row["target_tokens"], "depth": case_row["depth"],
                       "variant": v, "answer": case.answer, "output": res.text, "correct": case.answer in res.text,
                       "run_correct": case_row["correct"], "run_pool_kernel": result["config"].get("pool_kernel"),
                       "seconds": round(time.perf_counter() - t, 2)}
                rows.append(row)
                print(f"{row['task']} {row['question']:<8} {row['tokens']:>7} depth {row['depth']:.2f} {v:>9}: "
                      f"{'ok ' if row['correct'] else 'MISS'} {res.text.strip()[:30]!r} "
                      f"(run {'ok' if row['run_correct'] else 'MISS'})", file=sys.stderr, flush=True)
                os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
                with open(args.out, "w") as f:
                    json.dump({"variants": variants, "rows": rows}, f, indent=1)
    except ChunkingChanged as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("| task | question | tokens | " + " | ".join(variants) + " |")
    print("|---|---|---:|" + "---:|" * len(variants))
    for key in dict.fromkeys((r["task"], r["question"], r["tokens"]) for r in rows):
        cells = []
        for v in variants:
            sel = [r for r in rows if (r["task"], r["question"], r["tokens"], r["variant"]) == (*key, v)]
            cells.append(f"{sum(r['correct'] for r in sel)}/{len(sel)}")
        print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
