"""Prompt formats against question styles: which format answers natural and cue questions, on the bundled model.

    python benchmarks/prompt_formats.py --lengths 4000 --out benchmarks/results/prompt_formats_4k.json
    python benchmarks/prompt_formats.py --lengths 16000 --formats chat,chat-sys --out benchmarks/results/prompt_formats_16k.json

Every case is a passkey or NIAH case (parallelcomp_triton.tasks) asked in both question styles with no task
instruction (as a CLI user asks), greedy. Documents that fit the trained window run with full attention
(`mode="full"`), longer ones with ParallelComp. Formats:

- plain:      "{context}\\n\\n{question}" (the default until 2026-12-04)
- plain-qa:   "Document:\\n{context}\\n\\nQuestion: {question}\\nAnswer:"
- chat:       the tokenizer's chat template, its default system prompt
- chat-sys:   the chat template with a system prompt that says what the task is
- chat-instr: the chat template, the task said in the user turn before the document
- chat-terse: the chat template with a system prompt asking for the answer alone, copied from the document

Since 2026-12-04 the chat formats end in the assistant turn's {answer_start}: a cue question's trailing
"The pass key is" starts the answer (prompt.split_answer_start); natural questions are unaffected.

Writes every case to --out as it goes (JSON) and prints a table of accuracy per format, style, task and length.
Never asserts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

SYSTEM = "You answer questions about the document the user gives you. Answer briefly, from the document."
INSTRUCTION = "Answer the question about this document.\n\n"
TERSE = "Answer with the exact words or number from the document, nothing else."
FORMATS = ("plain", "plain-qa", "chat", "chat-sys", "chat-instr", "chat-terse")


def format_config(tokenizer, name: str) -> dict:
    """ParallelCompConfig fields for format `name`."""
    def chat(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + "{answer_start}"

    user = "{context}\n\n{question}"
    return {
        "plain": dict(template="plain"),
        "plain-qa": dict(prompt="Document:\n{context}\n\nQuestion: {question}\nAnswer:"),
        "chat": dict(template="chat"),
        "chat-sys": dict(prompt=chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])),
        "chat-instr": dict(prompt=chat([{"role": "user", "content": INSTRUCTION + "{context}\n\nQuestion: {question}"}])),
        "chat-terse": dict(prompt=chat([{"role": "system", "content": TERSE}, {"role": "user", "content": user}])),
    }[name]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--styles", default="natural,cue")
    p.add_argument("--tasks", default="passkey,niah")
    p.add_argument("--lengths", default="4000")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--seed", type=int, default=1, help="1: cases other than the accuracy grid's (seed 0)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default="results/prompt_formats.json")
    args = p.parse_args()

    from parallelcomp_triton import ParallelComp, ParallelCompConfig
    from parallelcomp_triton.eval import TASKS, _needle_chunk, _nll_rank

    pc = ParallelComp.from_pretrained(None, dtype=args.dtype)
    window = pc.args.max_position_embeddings
    rows = []
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    for n in [int(x) for x in args.lengths.split(",")]:
        for task in args.tasks.split(","):
            for fmt in args.formats.split(","):
                for style in args.styles.split(","):
                    for depth in [float(x) for x in args.depths.split(",")]:
                        case = TASKS[task](pc.tokenizer, n, depth=depth, seed=args.seed, question=style)
                        cfg = ParallelCompConfig(mode="full" if n + 200 < window else "parallelcomp",
                                                 max_new_tokens=args.max_new_tokens,
                                                 **format_config(pc.tokenizer, fmt))
                        t = time.perf_counter()
                        res = pc.generate(case.context, case.question, config=cfg)
                        needle = _needle_chunk(pc.tokenizer, case, res.stats.get("chunk_spans") or [])
                        rows.append({"format": fmt, "style": style, "task": task, "target_tokens": n, "depth": depth,
                                     "mode": cfg.mode, "answer": case.answer, "output": res.text,
                                     "correct": case.answer in res.text, "empty": not res.text.strip(),
                                     "needle_rank": _nll_rank(res.stats.get("chunk_nll_all"), needle),
                                     "seconds": round(time.perf_counter() - t, 1), "dtype": res.stats["dtype"]})
                        print(f"{n:>6} {task:>7} {fmt:>10} {style:>7} {depth:.1f}: "
                              f"{'ok ' if rows[-1]['correct'] else 'MISS'} {res.text.strip()[:50]!r}",
                              file=sys.stderr, flush=True)
                        with open(args.out, "w") as f:
                            json.dump({"seed": args.seed, "rows": rows}, f, indent=1)
    print("| tokens | task | format | natural | cue | empty answers (natural) |")
    print("|---:|---|---|---:|---:|---:|")
    keys = dict.fromkeys((r["target_tokens"], r["task"], r["format"]) for r in rows)
    for n, task, fmt in keys:
        sel = {s: [r for r in rows if (r["target_tokens"], r["task"], r["format"], r["style"]) == (n, task, fmt, s)]
               for s in ("natural", "cue")}
        cell = lambda rs: f"{sum(r['correct'] for r in rs)}/{len(rs)}" if rs else "-"  # noqa: E731
        print(f"| {n} | {task} | {fmt} | {cell(sel['natural'])} | {cell(sel['cue'])} | "
              f"{sum(r['empty'] for r in sel['natural'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
