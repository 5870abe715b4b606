"""Replay retrieval cases of an eval grid at the chunks each run kept, under other settings.

    python benchmarks/replay.py budget benchmarks/results/acc_niah_128k.json --budgets 256,768,none --keeps 1,5
    python benchmarks/replay.py pool benchmarks/results/acc_niah_128k.json --variants sym7,sym11,trail7
    python benchmarks/replay.py chunks benchmarks/results/natural_niah_16k_128k.json --tokens 128000 --depth 0.5

Chunk eviction ranks chunks before any KV is dropped (each chunk's question NLL comes from the full attention
inside the chunk), so the answer a run would give with another KV budget, pooling rule or chunk set is had by
encoding only the chunks it would keep (`ParallelComp.generate_from_chunks`, which reproduces a run exactly):
K chunks instead of the whole document, seconds instead of minutes at 128K. Every subcommand reads JSON
written by `python -m parallelcomp_triton.evaluate --json` (one question style or both), rebuilds each case
from the task's generator and refuses a run whose chunking has changed since (exit 2).

`budget`  other KV budgets B and chunk counts K: another B re-encodes the run's kept chunks; another K the K
          lowest-NLL chunks of the run's per-chunk NLLs (`chunk_nll`).
`pool`    other KV-eviction pooling windows around key j:
            symN     max over [j - N//2, j + N//2]   (select_kv's pool_kernel = N; sym7 is SnapKV's)
            trailN   max over [j - N + 1, j]         (a key is kept with the N - 1 keys after it)
            asym-A+B max over [j - A, j + B]
          trail and asym are applied to the scores before select_kv (pool_kernel = 1): an experiment, not a
          package option.
`chunks`  is a miss the prompt, KV eviction, or the merge of chunks? One case answered four ways: full
          attention over the needle's chunk alone; the needle's chunk as the only kept chunk (K = 1) at the
          run's B and with every key kept; the run's own kept chunks with every key kept (B = all).
`budget` and `pool` print one line per case and point, write JSON after every point and end with a summary
table; `chunks` prints one line per answer. None asserts timings.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time

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
    from parallelcomp_triton.evaluate import TASKS, needle_chunk

    for path, result in ((p, r) for p in paths for r in results_of(json.load(open(p)))):
        # Runs from before the template option used plain text.
        base = ParallelCompConfig(**{"template": "plain", **{k: v for k, v in result["config"].items() if k in settings}})
        for case_row in result["cases"]:
            if not case_row.get("kept_chunks"):
                continue
            case = TASKS[result["task"]](pc.tokenizer, case_row["target_tokens"], depth=case_row["depth"],
                                         question=result.get("question", "cue"))
            assert case.answer == case_row["answer"], "the case generator changed since the run"
            # `--instruction none` (the prompt a CLI user gets) is recorded; earlier runs had the task's.
            none = result.get("instruction") == "none"
            cfg = base if none else dataclasses.replace(base, instruction=case.instruction)
            spans = pc.plan(case.context, case.question, cfg).spans
            same = ([e for _, e in spans] == case_row["chunk_ends"] if "chunk_ends" in case_row else
                    len(spans) == case_row["chunks"] and
                    needle_chunk(pc.tokenizer, case, spans) == case_row.get("needle_chunk"))
            if not same:
                raise ChunkingChanged(f"{path}: the chunking changed since the run (depth {case_row['depth']}); "
                                      "replay it with the code that made it")
            yield path, result, case_row, case, cfg


def results_of(data: dict) -> list[dict]:
    """The results in an eval JSON: one, or one per question style (`--question-style both`)."""
    return [data] if "cases" in data else list(data.values())


def chunks_kept(case_row: dict, keep: int, run_keep: int) -> list[int] | None:
    """The chunks chunk eviction keeps at K = `keep`, in document order, by the pipeline's own rule."""
    from parallelcomp_triton.score import keep_best

    nll = case_row.get("chunk_nll")
    if not nll:
        return case_row["kept_chunks"] if keep == run_keep else None
    # None: a chunk the run did not score, ranked as a NaN is.
    best = keep_best(range(len(nll)), keep, nll_of=lambda c: float("nan") if nll[c] is None else nll[c],
                     index_of=lambda c: c)
    return sorted(best)


def write_json(path: str, data: dict) -> None:
    # After every point: a long replay stopped early keeps what it measured.
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


# --------------------------------------------------------------------------------------------------
# budget
# --------------------------------------------------------------------------------------------------


def replay_budget(pc, args) -> int:
    from parallelcomp_triton.cli import int_or_none

    budget_type = int_or_none("none")
    budgets = [budget_type(b.strip()) for b in args.budgets.split(",")]
    rows = []
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
                   "kv_tokens_after": res.stats.kv_tokens_per_layer_after,
                   "seconds": round(time.perf_counter() - t, 2)}
            rows.append(row)
            print(f"{row['task']} {row['question']:<8} {row['tokens']:>7} depth {row['depth']:.2f} K={keep} B={budget}: "
                  f"{'ok ' if row['correct'] else 'MISS'} {res.text.strip()[:30]!r} (was "
                  f"{'ok' if row['original_correct'] else 'MISS'} at K={chunking.keep_chunks} B={row['original_kv_budget']})",
                  file=sys.stderr, flush=True)
            write_json(args.out, {"budgets": budgets, "keeps": args.keeps, "rows": rows})
    print("| task | question | tokens | K | B | found (replayed) | needle chunk kept | merged KV tokens per layer |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for key in dict.fromkeys((r["task"], r["question"], r["tokens"], r["keep_chunks"], r["kv_budget"]) for r in rows):
        sel = [r for r in rows if (r["task"], r["question"], r["tokens"], r["keep_chunks"], r["kv_budget"]) == key]
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4] if key[4] is not None else 'all'} | "
              f"{sum(r['correct'] for r in sel)}/{len(sel)} | {sum(r['needle_kept'] for r in sel)}/{len(sel)} | "
              f"{max(r['kv_tokens_after'] for r in sel)} |")
    return 0


# --------------------------------------------------------------------------------------------------
# pool
# --------------------------------------------------------------------------------------------------


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


def replay_pool(pc, args) -> int:
    import parallelcomp_triton.score as score  # KV eviction calls select_kv by its name in score

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    windows = {v: window(v) for v in variants}
    select_kv, current = score.select_kv, {}

    def select(scores, cu, budget, pool_kernel=7, **kw):
        before, after = current["window"]
        if before == after:
            return select_kv(scores, cu, budget, pool_kernel=2 * before + 1, **kw)
        return select_kv(pooled(scores, cu, before, after), cu, budget, pool_kernel=1, **kw)

    score.select_kv = select
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
                write_json(args.out, {"variants": variants, "rows": rows})
    finally:
        score.select_kv = select_kv
    print("| task | question | tokens | " + " | ".join(variants) + " |")
    print("|---|---|---:|" + "---:|" * len(variants))
    for key in dict.fromkeys((r["task"], r["question"], r["tokens"]) for r in rows):
        cells = []
        for v in variants:
            sel = [r for r in rows if (r["task"], r["question"], r["tokens"], r["variant"]) == (*key, v)]
            cells.append(f"{sum(r['correct'] for r in sel)}/{len(sel)}")
        print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return 0


# --------------------------------------------------------------------------------------------------
# chunks
# --------------------------------------------------------------------------------------------------


def replay_chunks(pc, args) -> int:
    for _, result, row, case, cfg in run_cases(pc, args.results, RUN_SETTINGS + ("kv_budget", "pool_kernel")):
        if row["target_tokens"] != args.tokens or row["depth"] != args.depth:
            continue
        needle = row["needle_chunk"]
        plan = pc.plan(case.context, case.question, cfg)
        s, e = plan.spans[needle]
        chunk_text = pc.tokenizer.decode(plan.toks.document[s:e])
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    grids = "JSON written by `python -m parallelcomp_triton.evaluate --json`"

    b = sub.add_parser("budget", help="other KV budgets B and chunk counts K")
    b.add_argument("results", nargs="+", help=grids)
    b.add_argument("--budgets", default="768,none", help="B values to replay; 'none' keeps all")
    b.add_argument("--keeps", default=None, help="K values to replay (default: the run's own K); other "
                   "values need the run's per-chunk NLLs")
    b.add_argument("--out", default="results/budget_replay.json")

    q = sub.add_parser("pool", help="other KV-eviction pooling windows (symN, trailN, asym-A+B)")
    q.add_argument("results", nargs="+", help=grids)
    q.add_argument("--variants", default="sym7,sym11")
    q.add_argument("--out", default="results/pool_replay.json")

    c = sub.add_parser("chunks", help="one case: the needle's chunk alone, K = 1, the run's chunks with every key")
    c.add_argument("results", nargs=1, help=grids)
    c.add_argument("--tokens", type=int, required=True)
    c.add_argument("--depth", type=float, required=True)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from parallelcomp_triton import ParallelComp

    pc = ParallelComp.from_pretrained(None)
    replay = {"budget": replay_budget, "pool": replay_pool, "chunks": replay_chunks}[args.command]
    try:
        return replay(pc, args)
    except ChunkingChanged as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
