"""Encodings at one byte per stored K/V value (kv_store "int8") against exact ones: answers, size, time.

    python benchmarks/kv_store.py --out benchmarks/results/kv_store_grid.json
    python benchmarks/kv_store.py --timing --tokens 128000 --encoding /tmp/enc128 --repeats 3 \
        --out benchmarks/results/kv_store_timing.json

Default (the grid): per task, length and depth (parallelcomp_triton.tasks, the package defaults with the
task's instruction and answer room), the document is encoded exact and kept as int8 too (converted, or
encoded again with --encode-both; timed, sizes on disk), and every question style is answered from each encoding; the table gives per task and length the
score (RULER's share of required items) from each store, the cases whose score differs and the answers
that are not identical (the JSON has each answer's seconds too; --timing is the comparison of times).

--timing: one NIAH document (depth 0.4, seed 5, natural question, 12 new tokens, as benchmarks/followup.py),
an exact and an int8 encoding of it (made in --encoding DIR and DIR.int8 if missing), then per repeat four
variants in turn: each store with its chunk files in the page cache ("warm") or just dropped from it
("cold", POSIX_FADV_DONTNEED: as after a reboot, or once the OS has reclaimed an idle document). Reports
the median wall time and the process's CPU time per variant. Never asserts timings.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from followup import drop_from_page_cache, niah, timed_answer, write_json  # noqa: E402

STORES = ("exact", "int8")


def disk_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def grid(pc, args) -> int:
    from parallelcomp_triton import ParallelCompConfig
    from parallelcomp_triton.tasks import CASES

    rows = []
    for task in args.tasks.split(","):
        for n in map(int, args.lengths.split(",")):
            for depth in map(float, args.depths.split(",")):
                cases = {q: CASES[task](pc.tokenizer, n, depth=depth, seed=args.seed, question=q)
                         for q in args.questions.split(",")}
                first = next(iter(cases.values()))
                work = tempfile.mkdtemp(prefix="kv-store-")
                try:
                    cfg = ParallelCompConfig(instruction=first.instruction, max_new_tokens=first.max_new_tokens)
                    encodings, encode_s, size = {}, {}, {}
                    for store in STORES:
                        t = time.perf_counter()
                        if store == "int8" and not args.encode_both:  # the same files, without a second prefill
                            encodings[store] = encodings["exact"].save(os.path.join(work, store), kv_store=store)
                        else:
                            encodings[store] = pc.encode(first.context, dataclasses.replace(cfg, kv_store=store),
                                                         path=os.path.join(work, store))
                        encode_s[store] = time.perf_counter() - t
                        size[store] = disk_bytes(encodings[store].path)
                    for q, case in cases.items():
                        row = {"task": task, "length": n, "depth": depth, "question": q, "tokens": case.tokens,
                               "required": list(case.required or (case.answer,)), "encode_s": encode_s,
                               "bytes_per_token": {s: size[s] / case.tokens for s in STORES}}
                        for store in STORES:
                            t = time.perf_counter()
                            res = pc.generate(encodings[store], case.question, config=cfg)
                            row[store] = {"output": res.text, "token_ids": res.token_ids,
                                          "score": case.score(res.text), "seconds": time.perf_counter() - t,
                                          "kept_chunks": res.stats.kept_chunks}
                        rows.append(row)
                        print(f"{task:>10} {n:>7} {depth:.2f} {q:>8}: exact {row['exact']['score']:.2f} "
                              f"{row['exact']['output'].strip()[:30]!r} ({row['exact']['seconds']:.1f} s), int8 "
                              f"{row['int8']['score']:.2f} {row['int8']['output'].strip()[:30]!r} "
                              f"({row['int8']['seconds']:.1f} s)", file=sys.stderr, flush=True)
                        write_json(args.out, {"machine": machine(), "dtype": dtype_of(pc), "rows": rows})
                finally:
                    shutil.rmtree(work, ignore_errors=True)
    print(format_grid(rows))
    return 0


def format_grid(rows: list[dict]) -> str:
    # Follow-up seconds stay in the JSON only: one answer each, in a grid that runs for an hour, they time
    # whatever else the machine was doing; --timing compares them.
    lines = ["| task | tokens | cases | score exact | score int8 | cases scored differently | answers not identical |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key in dict.fromkeys((r["task"], r["length"]) for r in rows):
        sel = [r for r in rows if (r["task"], r["length"]) == key]
        mean = {s: 100 * statistics.mean(r[s]["score"] for r in sel) for s in STORES}
        differ = sum(r["exact"]["score"] != r["int8"]["score"] for r in sel)
        changed = sum(r["exact"]["token_ids"] != r["int8"]["token_ids"] for r in sel)
        lines.append(f"| {key[0]} | {key[1]} | {len(sel)} | {mean['exact']:.0f}% | {mean['int8']:.0f}% | {differ} | "
                     f"{changed} |")
    size = {s: statistics.median(r["bytes_per_token"][s] for r in rows) for s in STORES}
    enc = {s: statistics.median(r["encode_s"][s] / r["tokens"] * 1000 for r in rows) for s in STORES}
    lines.append(f"\nstore per document token: exact {size['exact']:.0f} B, int8 {size['int8']:.0f} B "
                 f"({size['int8'] / size['exact']:.2f}x); per 1000 tokens: encode {enc['exact']:.2f} s, int8 store "
                 f"{enc['int8']:.2f} s (medians; without --encode-both the int8 store is a conversion)")
    return "\n".join(lines)


def timing(pc, args) -> int:
    tokens = int(args.lengths)
    cfg, case = niah(pc, tokens)
    base = args.encoding or os.path.join(tempfile.mkdtemp(prefix="kv-store-"), "enc")
    encodings, encode_s = {}, {}
    for store, path in (("exact", base), ("int8", base + ".int8")):
        if os.path.isfile(os.path.join(path, "meta.json")):
            encodings[store] = pc.load_encoded(path)
        else:
            t = time.perf_counter()
            encodings[store] = pc.encode(case.context, dataclasses.replace(cfg, kv_store=store), path=path)
            encode_s[store] = time.perf_counter() - t
            print(f"encoded {store}: {encode_s[store]:.1f} s", file=sys.stderr, flush=True)
        assert encodings[store].kv_store == store, path
    size = {s: disk_bytes(e.path) for s, e in encodings.items()}
    for e in encodings.values():
        pc.generate(e, case.question, config=cfg)  # page both in
    variants = [(f"{store}, {state}", store, state == "cold") for state in ("warm", "cold") for store in STORES]
    runs = {name: [] for name, _, _ in variants}
    answers = {s: set() for s in STORES}
    for _ in range(args.repeats):
        for name, store, drop in variants:
            if drop:
                drop_from_page_cache(str(encodings[store].path))
            res, run = timed_answer(pc, encodings[store], case.question, cfg)
            runs[name].append(run)
            answers[store].add(res.text)
            print(f"{name}: {run['wall_s']:.2f} s (process CPU {run['cpu_s']:.2f} s) {res.text.strip()[:40]!r}",
                  file=sys.stderr, flush=True)
    table = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    print(f"{tokens} tokens; store: exact {size['exact'] / 2**30:.2f} GiB, int8 {size['int8'] / 2**30:.2f} GiB")
    print("| variant | wall s | process CPU s |")
    print("|---|---:|---:|")
    for name, m in table.items():
        print(f"| {name} | {m['wall_s']:.2f} | {m['cpu_s']:.2f} |")
    print(f"answers: {dict((s, sorted(a)) for s, a in answers.items())}; medians of {args.repeats}")
    write_json(args.out, {"machine": machine(), "dtype": dtype_of(pc), "tokens": tokens, "bytes": size,
                          "encode_s": encode_s,
                          "repeats": args.repeats, "medians": table, "runs": runs,
                          "answers": {s: sorted(a) for s, a in answers.items()}})
    if not args.encoding:
        shutil.rmtree(os.path.dirname(base), ignore_errors=True)
    return 0


def machine() -> str:
    from parallelcomp_triton.compare import machine as name

    return name()


def dtype_of(pc) -> str:
    return str(pc.model.embed_tokens.weight.dtype).removeprefix("torch.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--timing", action="store_true", help="warm and cold follow-up time of one long document")
    p.add_argument("--tasks", default="passkey,niah,multikey,multivalue,multiquery")
    p.add_argument("--lengths", "--tokens", dest="lengths", default=None,
                   help="document lengths, comma-separated (default 16000,32000; --timing: one, default 128000)")
    p.add_argument("--depths", default="0.25,0.5,0.75")
    p.add_argument("--questions", default="cue,natural", help="question styles asked of every document")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="--timing: runs per variant (median)")
    p.add_argument("--encoding", default=None,
                   help="--timing: the exact encoding's directory, kept and reused (the int8 one beside it)")
    p.add_argument("--encode-both", action="store_true",
                   help="grid: encode the int8 store too (default: convert the exact one, `EncodedDocument.save("
                        "path, kv_store='int8')`, which writes the same files: tests/test_kv_store.py)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default=None, help="JSON results")
    args = p.parse_args(argv)
    args.lengths = args.lengths or ("128000" if args.timing else "16000,32000")
    if args.timing and "," in args.lengths:
        p.error("--timing takes one length")

    from parallelcomp_triton import ParallelComp

    pc = ParallelComp.from_pretrained(None, dtype=args.dtype)
    return timing(pc, args) if args.timing else grid(pc, args)


if __name__ == "__main__":
    sys.exit(main())
