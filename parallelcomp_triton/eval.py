"""Long-context retrieval evaluation: accuracy tables over lengths x depths.

    python -m parallelcomp_triton.eval passkey --lengths 4000,16000 --depths 0.1,0.3,0.5,0.7,0.9
    python -m parallelcomp_triton.eval niah --lengths 32000 --question-style both --instruction none
    python -m parallelcomp_triton.eval niah --lengths 16000 --mode full --json results/niah.json
    python -m parallelcomp_triton.eval longbench --data hotpotqa.jsonl --limit 20 --json results/lb.json

A passkey or niah case counts as correct when the expected key appears in the generated text; longbench
scores LongBench-format JSONL with LongBench's metrics (see parallelcomp_triton.longbench).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time

from .config import DTYPE_CHOICES, MODES, SCORE_TOKENS, TEMPLATES, Calibration, ParallelCompConfig
from .errors import ParallelCompError
from .run import _budget, _chunk_tokens, _Parser
from .tasks import niah_case, passkey_case

TASKS = {"passkey": passkey_case, "niah": niah_case}


def _needle_chunk(tokenizer, case, spans) -> int | None:
    """Index of the chunk whose token span holds the first token of the answer (None: one chunk or not found)."""
    at = case.context.find(case.answer)
    if at < 0 or len(spans) < 2:
        return None
    tok = len(tokenizer.encode(case.context[:at], add_special_tokens=False))
    return next((i for i, (s, e) in enumerate(spans) if s <= tok < e), None)


def _nll_rank(nll, chunk) -> int | None:
    """1-based rank of `chunk` by NLL among all chunks (1: lowest); the needle is kept iff rank <= K."""
    if chunk is None or not nll:
        return None
    return 1 + sum(v < nll[chunk] for v in nll)


INSTRUCTIONS = ("task", "none")
QUESTION_STYLES = ("natural", "cue", "both")


def evaluate(pc, task: str, lengths, depths, config: ParallelCompConfig, question: str = "cue", seed: int = 0,
             log=None, instruction: str = "task") -> dict:
    """instruction: "task" puts the task's instruction before the document when `config` has none (how the
    grids up to 2026-12-03 ran); "none" leaves the prompt as a CLI user gets it."""
    return evaluate_styles(pc, task, lengths, depths, config, [question], seed, log, instruction)[0]


def evaluate_styles(pc, task: str, lengths, depths, config: ParallelCompConfig, questions, seed: int = 0,
                    log=None, instruction: str = "task") -> list[dict]:
    """`evaluate` for several question styles (or literal questions) on the same documents, one result per
    style. With ParallelComp and more than one question each document is encoded once and every question
    answered from the encoding (`ParallelComp.encode`): the same answers as fresh runs, by construction
    (tests/test_encode.py), for little more than the cost of one."""
    make = TASKS[task]
    rows: dict[str, list] = {q: [] for q in questions}
    for n in lengths:
        for depth in depths:
            cases = {q: make(pc.tokenizer, n, depth=depth, seed=seed, question=q) for q in questions}
            first = cases[questions[0]]
            cfg = config
            if instruction == "task" and not config.instruction:
                cfg = dataclasses.replace(config, instruction=first.instruction)
            source, encode_s = first.context, None
            if len(questions) > 1 and cfg.mode == "parallelcomp" and cfg.chunk_tokens is not None:
                t = time.perf_counter()
                source = pc.encode(first.context, cfg)
                encode_s = round(time.perf_counter() - t, 2)
            try:
                for q, case in cases.items():
                    assert case.context == first.context, "question styles must share the document"
                    t = time.perf_counter()
                    res = pc.generate(source, case.question, config=cfg)
                    row = _case_row(pc, case, n, depth, res, time.perf_counter() - t)
                    if encode_s is not None:
                        row["encode_seconds"] = encode_s
                    rows[q].append(row)
                    if log:
                        kept = "" if row["needle_chunk"] is None else (
                            f", needle chunk {'kept' if row['needle_kept'] else 'evicted'} (NLL rank {row['needle_rank']})")
                        style = f"{q:<8} " if len(questions) > 1 else ""
                        log(f"{task} {n:>7} depth {depth:.2f}: {style}{'ok ' if row['correct'] else 'MISS'} "
                            f"{res.text.strip()[:60]!r} ({row['seconds']} s{kept})")
            finally:
                if encode_s is not None:
                    source.close()
    dtype = str(pc.model.embed_tokens.weight.dtype).removeprefix("torch.")
    results = []
    for q in questions:
        acc = {}
        for n in lengths:
            sel = [r for r in rows[q] if r["target_tokens"] == n]
            acc[str(n)] = sum(r["correct"] for r in sel) / len(sel)
        results.append({"task": task, "question": q, "instruction": instruction, "dtype": dtype, "accuracy": acc,
                        "cases": rows[q]})
    return results


def _case_row(pc, case, n: int, depth: float, res, seconds: float) -> dict:
    needle_chunk = _needle_chunk(pc.tokenizer, case, res.stats.get("chunk_spans") or [])
    return {"tokens": case.tokens, "target_tokens": n, "depth": depth, "answer": case.answer,
            "output": res.text, "correct": case.answer in res.text, "seconds": round(seconds, 2),
            "template": res.stats.get("template"),
            "chunks": len(res.stats.get("chunk_spans", [])), "kept_chunks": res.stats.get("kept_chunks"),
            # where each chunk ends (document tokens): a replay checks it is cutting the same chunks
            "chunk_ends": [e for _, e in res.stats.get("chunk_spans") or []],
            "needle_chunk": needle_chunk, "needle_kept": needle_chunk in (res.stats.get("kept_chunks") or []),
            "needle_rank": _nll_rank(res.stats.get("chunk_nll_all"), needle_chunk),
            "chunk_nll": res.stats.get("chunk_nll_all"),  # lets benchmarks/budget_replay.py vary K
            "kv_tokens_after": res.stats.get("kv_tokens_per_layer_after"),
            "kv_cache_bytes": res.stats.get("kv_cache_bytes"),
            "peak_memory_bytes": res.stats.get("peak_memory_bytes")}


def format_table(*results: dict) -> str:
    """Accuracy and kept needles per length; several results (question styles) side by side."""
    head = " | ".join(f"{r.get('question', '')} accuracy | needle chunk kept" if len(results) > 1
                      else "accuracy | needle chunk kept" for r in results)
    lines = [f"| {results[0]['task']} tokens | {head} |", "|---:|" + "---:|---:|" * len(results)]
    for n in results[0]["accuracy"]:
        cells = []
        for result in results:
            sel = [r for r in result["cases"] if str(r["target_tokens"]) == n and r["needle_chunk"] is not None]
            kept = f"{sum(r['needle_kept'] for r in sel)}/{len(sel)}" if sel else "-"
            cells.append(f"{100 * result['accuracy'][n]:.0f}% | {kept}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "longbench":  # its own options: --data, --dataset, --limit, ...
        from .longbench import main as longbench_main

        return longbench_main(argv[1:])
    p = _Parser(prog="python -m parallelcomp_triton.eval", description=__doc__.split("\n")[0])
    p.add_argument("task", choices=sorted(TASKS) + ["longbench"],
                   help="longbench takes its own options (python -m parallelcomp_triton.eval longbench --help)")
    p.add_argument("--lengths", default="16000", help="comma-separated document lengths in tokens")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--question-style", choices=QUESTION_STYLES, default=None,
                   help="natural ('What is the pass key?'), cue (ends in an answer cue: '... The pass key is') or "
                        "both, side by side (default: cue)")
    p.add_argument("--question", default=None, help="a literal question instead of a style")
    p.add_argument("--instruction", choices=INSTRUCTIONS, default="task",
                   help="task: the task's instruction before the document (the earlier grids); none: the prompt "
                        "a CLI user gets")
    p.add_argument("--model", default=None)
    p.add_argument("--mode", choices=MODES, default="parallelcomp")
    p.add_argument("--template", choices=TEMPLATES, default=ParallelCompConfig.template)
    p.add_argument("--keep-chunks", type=int, default=ParallelCompConfig.keep_chunks)
    p.add_argument("--score-tokens", choices=SCORE_TOKENS, default=ParallelCompConfig.score_tokens)
    p.add_argument("--kv-budget", type=_budget, default=ParallelCompConfig.kv_budget)
    p.add_argument("--pool-kernel", type=int, default=ParallelCompConfig.pool_kernel)
    p.add_argument("--chunk-tokens", type=_chunk_tokens, default=ParallelCompConfig.chunk_tokens,
                   help="document tokens per chunk, or 'max' (as many as the window allows)")
    p.add_argument("--batch-chunks", type=int, default=ParallelCompConfig.batch_chunks)
    p.add_argument("--calibrate", default=None)
    p.add_argument("--max-new-tokens", type=int, default=ParallelCompConfig.max_new_tokens,
                   help="as the CLI (natural answers restate the question before the answer)")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the full result to this file")
    args = p.parse_args(argv)
    if args.task == "longbench":  # options came before the subcommand
        print("error: longbench must come first: python -m parallelcomp_triton.eval longbench --data FILE ...",
              file=sys.stderr)
        return 2
    if args.question is not None and args.question_style is not None:
        print("error: give --question-style or a literal --question, not both", file=sys.stderr)
        return 2
    if args.question in ("natural", "cue"):  # the earlier spelling of --question-style
        args.question_style, args.question = args.question, None
    style = args.question_style or "cue"
    questions = [args.question] if args.question is not None else (["natural", "cue"] if style == "both" else [style])
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x]
        depths = [float(x) for x in args.depths.split(",") if x]
    except ValueError:
        print("error: --lengths and --depths take comma-separated numbers", file=sys.stderr)
        return 2
    try:
        if not lengths or not depths or min(lengths) < 100 or not all(0 <= d <= 1 for d in depths):
            raise ParallelCompError("--lengths must be >= 100 tokens and --depths in [0, 1]")
        from .pipeline import ParallelComp

        cfg = ParallelCompConfig(mode=args.mode, template=args.template, keep_chunks=args.keep_chunks,
                                 score_tokens=args.score_tokens, pool_kernel=args.pool_kernel,
                                 kv_budget=args.kv_budget, chunk_tokens=args.chunk_tokens,
                                 batch_chunks=args.batch_chunks, max_new_tokens=args.max_new_tokens,
                                 calibration=Calibration.parse(args.calibrate) if args.calibrate else None)
        cfg.check()
        pc = ParallelComp.from_pretrained(args.model, dtype=args.dtype, backend=args.backend)
        results = evaluate_styles(pc, args.task, lengths, depths, cfg, questions, seed=args.seed,
                                  log=lambda s: print(s, file=sys.stderr, flush=True), instruction=args.instruction)
    except ParallelCompError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for result in results:
        result["config"] = dataclasses.asdict(cfg)
    print(format_table(*results))
    if args.json:
        # One style: the result itself (what budget_replay.py and pool_replay.py read); both: one per style.
        with open(args.json, "w") as f:
            json.dump(results[0] if len(results) == 1 else {r["question"]: r for r in results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
