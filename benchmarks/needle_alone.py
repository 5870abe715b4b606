"""Is a retrieval miss the prompt, KV eviction, or the merge of chunks? Replay one case of an eval grid.

    python benchmarks/needle_alone.py benchmarks/results/natural_niah_16k_128k.json --tokens 128000 --depth 0.5

For each question style in the JSON, answers the case (rebuilt from the task's generator) four ways: full
attention over the needle's chunk alone; the needle's chunk as the only kept chunk (K = 1) at the run's B
and with every key kept; the run's own kept chunks with every key kept (B = all). Chunk eviction ranks
chunks before any KV is dropped, so the chunk replays are what runs with those settings would answer
(`ParallelComp.generate_from_chunks`). Prints one line per answer; never asserts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def main() -> int:
    from budget_replay import RUN_SETTINGS, run_cases
    from parallelcomp_triton import ParallelComp

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", help="JSON written by `python -m parallelcomp_triton.eval --json`")
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--depth", type=float, required=True)
    args = p.parse_args()
    pc = ParallelComp.from_pretrained(None)
    for _, result, row, case, cfg in run_cases(pc, [args.results], RUN_SETTINGS + ("kv_budget", "pool_kernel")):
        if row["target_tokens"] != args.tokens or row["depth"] != args.depth:
            continue
        needle = row["needle_chunk"]
        doc = pc.prepare(cfg, case.context, case.question)
        s, e = doc.spans[needle]
        chunk_text = pc.tokenizer.decode(doc.toks.document[s:e])
        ways = [("full attention, the needle's chunk alone", dataclasses.replace(cfg, mode="full"), chunk_text, None),
                (f"K = 1 (the needle's chunk), B = {cfg.kv_budget}", dataclasses.replace(cfg, keep_chunks=1),
                 case.context, [needle]),
                ("K = 1 (the needle's chunk), B = all", dataclasses.replace(cfg, keep_chunks=1, kv_budget=None),
                 case.context, [needle]),
                (f"the run's chunks {row['kept_chunks']}, B = all", dataclasses.replace(cfg, kv_budget=None),
                 case.context, row["kept_chunks"])]
        print(f"{result['task']} {args.tokens} depth {args.depth} {result.get('question', 'cue')}: answer "
              f"{case.answer}, the run said {row['output'].strip()!r}")
        for name, c, context, chunks in ways:
            r = (pc.generate(context, case.question, config=c) if chunks is None
                 else pc.generate_from_chunks(context, case.question, chunks, config=c))
            print(f"  {name:<42} {'ok ' if case.answer in r.text else 'MISS'} {r.text.strip()!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
