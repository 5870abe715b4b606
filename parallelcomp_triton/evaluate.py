"""Long-context retrieval evaluation: accuracy tables over lengths x depths.

    python -m parallelcomp_triton.evaluate passkey --lengths 4000,16000 --depths 0.1,0.3,0.5,0.7,0.9
    python -m parallelcomp_triton.evaluate niah --lengths 32000 --question-style both --instruction none
    python -m parallelcomp_triton.evaluate niah --lengths 16000 --mode full --json results/niah.json
    python -m parallelcomp_triton.evaluate longbench --data hotpotqa.jsonl --limit 20 --json results/lb.json
    python -m parallelcomp_triton.evaluate compare --methods parallelcomp,streaming,yarn --tasks passkey,multikey \
        --lengths 4000,16000 --json results/compare.json --plot results/compare.png

`compare` runs several methods (modes) over the RULER-style tasks as well (parallelcomp_triton.compare).
A passkey or niah case counts as correct when the expected key appears in the generated text; longbench
scores LongBench-format JSONL with LongBench's metrics (see parallelcomp_triton.longbench).
`python -m parallelcomp_triton.eval` is an alias.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from .cli import Parser, add_model_options, add_settings_options, check_writable, cli_main, config_from_args
from .config import ParallelCompConfig
from .errors import ParallelCompError
from .tasks import niah_case, passkey_case

TASKS = {"passkey": passkey_case, "niah": niah_case}


def needle_chunk(tokenizer, case, spans, answer: str | None = None) -> int | None:
    """Index of the chunk whose token span holds the first token of the answer (or of `answer`, another
    string the case requires; None: one chunk or not found)."""
    at = case.context.find(answer or case.answer)
    if at < 0 or len(spans) < 2:
        return None
    tok = len(tokenizer.encode(case.context[:at], add_special_tokens=False))
    return next((i for i, (s, e) in enumerate(spans) if s <= tok < e), None)


def nll_rank(nll, chunk) -> int | None:
    """1-based rank of `chunk` by NLL among all chunks (1: lowest); the needle is kept iff rank <= K."""
    if chunk is None or not nll:
        return None
    return 1 + sum(v < nll[chunk] for v in nll)


INSTRUCTIONS = ("task", "none")
QUESTION_STYLES = ("natural", "cue", "both")


def evaluate(pc, task: str, lengths, depths, config: ParallelCompConfig, question: str = "cue", seed: int = 0,
             log=None, instruction: str = "task") -> dict:
    """instruction: "task" puts the task's instruction before the document when `config` has none; "none"
    leaves the prompt as a CLI user gets it."""
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
    st = res.stats
    chunk = needle_chunk(pc.tokenizer, case, st.chunk_spans)
    return {"tokens": case.tokens, "target_tokens": n, "depth": depth, "answer": case.answer,
            "output": res.text, "correct": case.answer in res.text, "seconds": round(seconds, 2),
            "template": st.template, "chunks": len(st.chunk_spans), "kept_chunks": st.kept_chunks,
            # where each chunk ends (document tokens): a replay checks it is cutting the same chunks
            "chunk_ends": [e for _, e in st.chunk_spans],
            "needle_chunk": chunk, "needle_kept": chunk in st.kept_chunks,
            "needle_rank": nll_rank(st.chunk_nll_all, chunk),
            "chunk_nll": st.chunk_nll_all,  # lets benchmarks/replay.py vary K
            "kv_tokens_after": st.kv_tokens_per_layer_after, "kv_cache_bytes": st.kv_cache_bytes,
            "peak_memory_bytes": st.peak_memory_bytes}


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


def build_parser() -> Parser:
    p = Parser(prog="python -m parallelcomp_triton.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("task", choices=sorted(TASKS) + ["longbench", "compare"],
                   help="longbench and compare take their own options (python -m parallelcomp_triton.evaluate "
                        "compare --help)")
    p.add_argument("--lengths", default="16000", help="comma-separated document lengths in tokens")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--question-style", choices=QUESTION_STYLES, default=None,
                   help="natural ('What is the pass key?'), cue (ends in an answer cue: '... The pass key is') or "
                        "both, side by side (default: cue)")
    p.add_argument("--question", default=None, help="a literal question instead of a style")
    # Not the settings' --instruction (a text): which instruction goes before the document.
    p.add_argument("--instruction", dest="instruction_source", choices=INSTRUCTIONS, default="task",
                   help="task: the task's instruction before the document (default); none: the prompt a CLI "
                        "user gets")
    add_model_options(p)
    add_settings_options(p, omit=("instruction",), seed=0,
                         helps={"seed": "seed of the generated documents (and of sampling)"})
    p.add_argument("--json", default=None, help="write the full result to this file")
    return p


def build_longbench_parser() -> Parser:
    from .longbench import TASKS as LONGBENCH_TASKS

    p = Parser(prog="python -m parallelcomp_triton.evaluate longbench",
               description="Score ParallelComp on LongBench-format JSONL with the standard LongBench metrics.")
    p.add_argument("--data", required=True, help="LongBench JSONL file")
    p.add_argument("--dataset", default=None, help=f"score only this task's records (default: every record, "
                                                   f"by its 'dataset' field, else the file name); one of "
                                                   f"{', '.join(LONGBENCH_TASKS)}")
    p.add_argument("--limit", type=int, default=None, help="score only the first N records")
    add_model_options(p)
    # The instruction is LongBench's prompt; the template picks how that prompt is wrapped (build_prompt).
    add_settings_options(p, omit=("instruction",), max_new_tokens=None, helps={
        "template": "auto: the chat template where LongBench uses one (default)",
        "max_new_tokens": "default: LongBench's per-dataset length"})
    p.add_argument("--json", default=None, help="write scores and predictions to this file")
    return p


def build_compare_parser() -> Parser:
    from .compare import __doc__ as doc
    from .tasks import CASES

    p = Parser(prog="python -m parallelcomp_triton.evaluate compare", description=doc.split("\n")[0])
    p.add_argument("--methods", default="parallelcomp,streaming,truncate",
                   help="comma-separated modes (parallelcomp, full, truncate, yarn, dynamic-ntk, self-extend, "
                        "streaming)")
    p.add_argument("--tasks", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--lengths", default="4000,16000", help="comma-separated document lengths in tokens")
    p.add_argument("--depths", default="0.25,0.5,0.75", help="where the needle asked for sits (a case per depth)")
    p.add_argument("--question-style", choices=("natural", "cue"), default="cue",
                   help="cue: the question ends in the start of its answer (RULER's style; default)")
    p.add_argument("--reference-length", type=int, default=4000,
                   help="in-window reference length: full attention and parallelcomp measured there first")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="skip cells estimated to take longer per question (from the method at a shorter length)")
    add_model_options(p)
    add_settings_options(p, omit=("mode",), seed=0, max_new_tokens=None,
                         helps={"seed": "seed of the generated documents (and of sampling)",
                                "max_new_tokens": "default: each task's (room for all it asks for)"})
    p.add_argument("--json", default=None, help="write the result here (rewritten after every cell)")
    p.add_argument("--resume", action="store_true",
                   help="keep the cells already in --json (same model, cases and settings) and add this grid's")
    p.add_argument("--plot", default=None, help="write a PNG of accuracy against length per task")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "longbench":  # its own options: --data, --dataset, --limit, ...
        return cli_main(argv[1:], build_longbench_parser, _main_longbench)
    if argv and argv[0] == "compare":
        return cli_main(argv[1:], build_compare_parser, _main_compare)
    return cli_main(argv, build_parser, _main)


def _main_compare(args) -> int:
    from . import compare
    from .pipeline import ParallelComp

    try:
        grid = compare.Grid(methods=[m for m in args.methods.split(",") if m],
                            tasks=[t for t in args.tasks.split(",") if t],
                            lengths=[int(x) for x in args.lengths.split(",") if x],
                            depths=[float(x) for x in args.depths.split(",") if x], question=args.question_style,
                            reference_length=args.reference_length, max_seconds=args.max_seconds, seed=args.seed,
                            max_new_tokens=args.max_new_tokens)
    except ValueError:
        raise ParallelCompError("--lengths and --depths take comma-separated numbers") from None
    grid.check()
    cfg = config_from_args(args, max_new_tokens=ParallelCompConfig.max_new_tokens)  # the grid's, per case
    for path in (args.json, args.plot):
        if path:
            check_writable(path)
    if args.plot:  # matplotlib checked before the model loads
        import importlib.util
        if importlib.util.find_spec("matplotlib") is None:
            raise ParallelCompError("--plot needs matplotlib: pip install 'parallelcomp-triton[plot]'")
    previous = None
    if args.resume:
        if not args.json or not os.path.exists(args.json):
            raise ParallelCompError("--resume needs the --json file of an earlier run")
        try:
            with open(args.json) as f:
                previous = json.load(f)
        except (OSError, ValueError) as e:
            raise ParallelCompError(f"--resume: cannot read {args.json} ({e})") from None
    pc = ParallelComp.from_pretrained(args.model, dtype=args.dtype, backend=args.backend)
    save = (lambda r: compare.save_json(r, args.json)) if args.json else None
    result = compare.compare(pc, grid, cfg, log=lambda s: print(s, file=sys.stderr, flush=True), save=save,
                             previous=previous)
    if save:
        save(result)
    if args.plot:
        compare.plot(result, args.plot)
    print(compare.format_table(result))
    return 0


def _main(args) -> int:
    if args.task in ("longbench", "compare"):  # options came before the subcommand
        raise ParallelCompError(f"{args.task} must come first: python -m parallelcomp_triton.evaluate "
                                f"{args.task} ...")
    if args.question is not None and args.question_style is not None:
        raise ParallelCompError("give --question-style or a literal --question, not both")
    if args.question in ("natural", "cue"):  # a style's name given as --question: taken as --question-style
        args.question_style, args.question = args.question, None
    style = args.question_style or "cue"
    questions = [args.question] if args.question is not None else (["natural", "cue"] if style == "both" else [style])
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x]
        depths = [float(x) for x in args.depths.split(",") if x]
    except ValueError:
        raise ParallelCompError("--lengths and --depths take comma-separated numbers") from None
    if not lengths or not depths or min(lengths) < 100 or not all(0 <= d <= 1 for d in depths):
        raise ParallelCompError("--lengths must be >= 100 tokens and --depths in [0, 1]")
    from .pipeline import ParallelComp

    cfg = config_from_args(args)
    pc = ParallelComp.from_pretrained(args.model, dtype=args.dtype, backend=args.backend)
    results = evaluate_styles(pc, args.task, lengths, depths, cfg, questions, seed=args.seed,
                              log=lambda s: print(s, file=sys.stderr, flush=True),
                              instruction=args.instruction_source)
    for result in results:
        result["config"] = dataclasses.asdict(cfg)
    print(format_table(*results))
    if args.json:
        # One style: the result itself; both: one per style (benchmarks/replay.py reads either).
        with open(args.json, "w") as f:
            json.dump(results[0] if len(results) == 1 else {r["question"]: r for r in results}, f, indent=1)
    return 0


def _main_longbench(args) -> int:
    from . import longbench
    from .pipeline import ParallelComp

    # Each record decodes its task's length or --max-new-tokens (evaluate_longbench), whatever the config says.
    cfg = config_from_args(args, template=ParallelCompConfig.template, max_new_tokens=ParallelCompConfig.max_new_tokens)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ParallelCompError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    if args.json:
        check_writable(args.json)
    records = longbench.load_records(args.data, args.dataset, args.limit)
    # Metric libraries are checked before the model loads, not after the first generation.
    for metric in {longbench.task_for(r["dataset"]).metric for r in records}:
        if metric in ("rouge_l", "code_sim"):
            longbench.METRICS[metric]("a", "a")
    pc = ParallelComp.from_pretrained(args.model, dtype=args.dtype, backend=args.backend)
    result = longbench.evaluate_longbench(pc, records, cfg, template=args.template, max_new_tokens=args.max_new_tokens,
                                          log=lambda s: print(s, file=sys.stderr, flush=True))
    result.update(data=args.data, template=args.template, config=dataclasses.asdict(cfg))
    print(longbench.format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
