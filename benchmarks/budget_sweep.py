"""Memory/accuracy trade of the two eviction budgets: B (KV tokens kept per chunk, layer and KV head) and
K (chunks kept), on the bundled model.

    python benchmarks/budget_sweep.py --task niah --tokens 16000 --budgets 64,256,1024 --keeps 1,3,5 \
        --out results/budget.json

Runs every B with the default K and every K with the default B (not the full grid: each point is a few
minutes on a CPU), each over the same cases (--depths). Reports accuracy, the merged KV-cache bytes that
decoding works on and the seconds per case. Prints a markdown table; never asserts timings.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=("passkey", "niah"), default="niah")
    p.add_argument("--tokens", type=int, default=16000)
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--budgets", default="64,256,1024", help="B values (with the default K); 'none' keeps all")
    p.add_argument("--keeps", default="1,3,5", help="K values (with the default B)")
    p.add_argument("--out", default="results/budget.json")
    args = p.parse_args()

    from parallelcomp_triton import ParallelComp, ParallelCompConfig
    from parallelcomp_triton.cli import int_or_none
    from parallelcomp_triton.evaluate import evaluate

    d = ParallelCompConfig()
    depths = [float(x) for x in args.depths.split(",")]
    budget_type = int_or_none("none")
    points = [(budget_type(b.strip()), d.keep_chunks) for b in args.budgets.split(",")]
    points += [(d.kv_budget, int(k)) for k in args.keeps.split(",")]
    points = list(dict.fromkeys(points))

    pc = ParallelComp.from_pretrained(None)
    rows = []
    for budget, keep in points:
        cfg = ParallelCompConfig(kv_budget=budget, keep_chunks=keep, max_new_tokens=12)
        t = time.perf_counter()
        res = evaluate(pc, args.task, [args.tokens], depths, cfg)
        kv = [case["kv_cache_bytes"] for case in res["cases"]]  # the merged cache decoding reads every step
        acc = res["accuracy"][str(args.tokens)]
        row = {"kv_budget": budget, "keep_chunks": keep, "accuracy": acc, "merged_kv_bytes": int(sum(kv) / len(kv)),
               "seconds_per_case": (time.perf_counter() - t) / len(depths), "cases": res["cases"]}
        rows.append(row)
        print(f"B={budget} K={keep}: {100 * acc:.0f}%  KV {row['merged_kv_bytes'] / 2**20:.1f} MiB  "
              f"{row['seconds_per_case']:.1f} s/case", file=sys.stderr, flush=True)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:  # after every point: a long sweep stopped early keeps what it measured
            json.dump({"task": args.task, "tokens": args.tokens, "depths": depths,
                       "config": dataclasses.asdict(ParallelCompConfig()), "rows": rows}, f, indent=1)
    print(f"| {args.task} {args.tokens} tokens: B (per chunk, layer, KV head) | K | accuracy | merged KV MiB | s/case |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kv_budget'] if r['kv_budget'] is not None else 'all'} | {r['keep_chunks']} | "
              f"{100 * r['accuracy']:.0f}% | {r['merged_kv_bytes'] / 2**20:.1f} | {r['seconds_per_case']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
