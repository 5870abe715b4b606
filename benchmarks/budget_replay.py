"""Replay retrieval cases with other KV budgets B and chunk counts K, from a run's chunk scores.

    python benchmarks/budget_replay.py benchmarks/results/acc_niah_128k.json --budgets 256,768,none --keeps 1,5

Chunk eviction does not depend on B: each chunk's question NLL comes from the full attention inside the
chunk, before any KV is dropped. So the answer a run would give with another B is had by encoding only the
K chunks it kept (same spans, same positions, same prefix and question) and letting KV eviction keep B of
each; and with another K, by encoding the K lowest-NLL chunks of the run's per-chunk NLLs (`chunk_nll`,
recorded by `parallelcomp_triton.eval`). This costs K chunks instead of the whole document: seconds instead
of minutes at 128K. Prints one line per case and point and a summary table; never asserts timings.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time


def main() -> int:
    from parallelcomp_triton import ParallelComp
    from parallelcomp_triton.run import _budget

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", help="JSON written by `python -m parallelcomp_triton.eval --json`")
    p.add_argument("--budgets", default="768,none", help="B values to replay; 'none' keeps all")
    p.add_argument("--keeps", default=None, help="K values to replay (default: the run's own K); other "
                   "values need the run's per-chunk NLLs")
    p.add_argument("--out", default="results/budget_replay.json")
    args = p.parse_args()
    budgets = [_budget(b.strip()) for b in args.budgets.split(",")]
    pc = ParallelComp.from_pretrained(None)
    rows = []
    try:
        for path, result, case_row, case, chunking in run_cases(pc, args.results, RUN_SETTINGS + ("pool_kernel",)):
            keeps = [int(k) for k in args.keeps.split(",")] if args.keeps else [chunking.keep_chunks]
            for keep, budget in [(k, b) for k in keeps for b in budgets]:
                kept = chunks_kept(case_row, keep, chunking.keep_chunks)
                if kept is None:
                    print(f"{path}: no per-chunk NLLs, cannot replay K={keep}", file=sys.stderr)
                    continue
                cfg = dataclasses.replace(chunking, kv_budget=budget, keep_chunks=keep)
                t = time.perf_counter()
                res = pc.generate_from_chunks(case.context, case.question, kept, config=cfg)
                row = {"task": result["task"], "question": result.get("question", "cue"),
                       "tokens": case_row["target_tokens"], "depth": case_row["depth"],
                       "kv_budget": budget, "keep_chunks": keep, "kept_chunks": kept,
                       "needle_kept": case_row.get("needle_chunk") in kept, "answer": case.answer, "output": res.text,
                       "correct": case.answer in res.text, "original_correct": case_row["correct"],
                       "original_kv_budget": result["config"].get("kv_budget"),
                       "kv_tokens_after": res.stats["kv_tokens_per_layer_after"],
                       "seconds": round(time.perf_counter() - t, 2)}
                rows.append(row)
                print(f"{row['task']} {row['question']:<8} {row['tokens']:>7} depth {row['depth']:.2f} K={keep} B={budget}: "
                      f"{'ok ' if row['correct'] else 'MISS'} {res.text.strip()[:30]!r} (was "
                      f"{'ok' if row['original_correct'] else 'MISS'} at K={chunking.keep_chunks} B={row['original_kv_budget']})",
                      file=sys.stderr, flush=True)
                os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
                with open(args.out, "w") as f:
                    json.dump({"budgets": budgets, "keeps": args.keeps, "rows": rows}, f, indent=1)
    except ChunkingChanged as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("| task | question | tokens | K | B | found (replayed) | needle chunk kept | merged KV tokens per layer |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for key in dict.fromkeys((r["task"], r["question"], r["tokens"], r["keep_chunks"], r["kv_budget"]) for r in rows):
        sel = [r for r in rows if (r["task"], r["question"], r["tokens"], r["keep_chunks"], r["kv_budget"]) == key]
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4] if key[4] is not None else 'all'} | "
              f"{sum(r['correct'] for r in sel)}/{len(sel)} | {sum(r['needle_kept'] for r in sel)}/{len(sel)} | "
              f"{max(r['kv_tokens_after'] for r in sel)} |")
    return 0


# The run's settings a replay keeps: those that decide the chunks and how a kept chunk is encoded.
RUN_SETTINGS = ("chunk_tokens", "snap_to_sentences", "keep_chunks", "max_new_tokens", "score_window", "gqa_reduce",
                "template")


class ChunkingChanged(Exception):
    pass


def run_cases(pc, paths, settings=RUN_SETTINGS):
    """Yield (path, result, case row, case, config) for every case of the eval JSONs at `paths` that kept
    chunks; the config holds the run's `settings` and the case's instruction. Rebuilds each case and checks
    that it cuts the run's chunks (the chunk ends the run recorded, else the chunk count and the needle's
    chunk); raises ChunkingChanged when it does not."""
    from parallelcomp_triton import ParallelCompConfig
    from parallelcomp_triton.eval import TASKS, _needle_chunk

    for path, result in ((p, r) for p in paths for r in _results(json.load(open(p)))):
        # Runs from before the template option used plain text.
        base = ParallelCompConfig(**{"template": "plain", **{k: v for k, v in result["config"].items() if k in settings}})
        for case_row in result["cases"]:
            if not case_row.get("kept_chunks"):
                continue
            case = TASKS[result["task"]](pc.tokenizer, case_row["target_tokens"], depth=case_row["depth"],
                                         question=result.get("question", "cue"))
            assert case.answer == case_row["answer"], "the case generator changed since the run"
            # `eval --instruction none` (the prompt a CLI user gets) records it; earlier runs had the task's.
            none = result.get("instruction") == "none"
            cfg = base if none else dataclasses.replace(base, instruction=case.instruction)
            spans = pc.prepare(cfg, case.context, case.question).spans
            same = ([e for _, e in spans] == case_row["chunk_ends"] if "chunk_ends" in case_row else
                    len(spans) == case_row["chunks"] and
                    _needle_chunk(pc.tokenizer, case, spans) == case_row.get("needle_chunk"))
            if not same:
                raise ChunkingChanged(f"{path}: the chunking changed since the run (depth {case_row['depth']}); "
                                      "replay it with the code that made it")
            yield path, result, case_row, case, cfg


def _results(data: dict) -> list[dict]:
    """The results in an eval JSON: one, or one per question style (`--question-style both`)."""
    return [data] if "cases" in data else list(data.values())


def chunks_kept(case_row: dict, keep: int, run_keep: int) -> list[int] | None:
    """The chunks chunk eviction keeps at K = `keep`: the K lowest NLL (NaN last, ties: earlier chunk, the
    pipeline's own order), in document order."""
    from parallelcomp_triton.pipeline import _nan_last

    nll = case_row.get("chunk_nll")
    if not nll:
        return case_row["kept_chunks"] if keep == run_keep else None
    order = sorted(range(len(nll)), key=lambda c: (_nan_last(nll[c]), c))
    return sorted(order[:keep])


if __name__ == "__main__":
    sys.exit(main())
